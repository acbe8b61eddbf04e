//! The saga as a state machine: events in, transitions out.
//!
//! [`Machine::handle`] decides what an event means for the run and returns it
//! as [`Transition`]s, already applied to the record. It does no I/O and reads
//! no clock of its own, so each transition is tested directly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use orchestrix_proto::{
    CommandKind, ControlAction, OperatorAction, OutcomeResult, Payload, RunStatus, StepCommand,
    StepOutput, StepStatus, WireError,
};
use tokio::time::Instant;
use uuid::Uuid;

use crate::bus::Liveness;
use crate::record::{
    Current, LateNote, MAX_LATE_NOTES, PauseRecord, Phase, RetryAt, RunRecord, Transition, bounded,
};
use crate::{FlowDef, Hooks, OnExhausted, OnUnknown, RetryPolicy};

/// A flow as the engine runs it: its definition and the hooks to call.
#[derive(Clone)]
pub(crate) struct FlowPlan {
    pub(crate) def: FlowDef,
    /// `def.version()`, computed once.
    pub(crate) version: Arc<str>,
    pub(crate) hooks: Vec<Arc<dyn Hooks>>,
    /// `def.input_schema`, compiled once.
    input_check: Option<Arc<jsonschema::Validator>>,
}

impl FlowPlan {
    pub(crate) fn new(def: FlowDef, hooks: Vec<Arc<dyn Hooks>>) -> Self {
        let input_check = def.input_schema.as_deref().and_then(|text| {
            let compiled = serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|schema| jsonschema::validator_for(&schema).map_err(|e| e.to_string()));
            match compiled {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    // A worker's schema this validator cannot read must not
                    // stop the flow: its inputs go unchecked, and it says so.
                    tracing::warn!(flow = %def.name, error = %e, "the flow's input schema is not usable; inputs are not checked");
                    None
                }
            }
        });
        FlowPlan { version: def.version(), def, hooks, input_check }
    }

    /// Checks a run's input (MessagePack) against the flow's input schema:
    /// `Err` lists what does not match, at most a few, each with its place.
    pub(crate) fn check_input(&self, input: &[u8]) -> Result<(), String> {
        let Some(check) = &self.input_check else { return Ok(()) };
        let value: serde_json::Value = if input.is_empty() {
            serde_json::Value::Null
        } else {
            orchestrix_proto::from_msgpack(input)
                .map_err(|e| format!("the input does not decode: {e}"))?
        };
        let problems: Vec<String> = check
            .iter_errors(&value)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() { e.to_string() } else { format!("{at}: {e}") }
            })
            .collect();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

/// Where a run's machine gets its command ids and its jitter: handed in from
/// outside, so that the same events and the same entropy always lead to the
/// same decisions (a run can be replayed).
#[derive(Debug, Clone)]
pub(crate) struct Entropy {
    rng: fastrand::Rng,
}

impl Entropy {
    /// Fresh randomness, for a live run.
    pub(crate) fn random() -> Self {
        Entropy { rng: fastrand::Rng::new() }
    }

    /// A fixed sequence, for replays and tests.
    #[cfg(test)]
    pub(crate) fn seeded(seed: u64) -> Self {
        Entropy { rng: fastrand::Rng::with_seed(seed) }
    }

    fn command_id(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// Every decision the machine makes, by name: the rows of the transition
/// table in `docs/architecture.md`. The coverage test fails when one is never
/// exercised, or missing from the table.
#[cfg(test)]
pub(crate) const DECISIONS: &[&str] = &[
    "start",
    "acked",
    "completed",
    "compensated",
    "output-refused",
    "failed-retry",
    "failed-for-good",
    "compensation-failed",
    "unknown-maybe-done",
    "unknown-retry",
    "not-taken",
    "redispatch",
    "no-worker",
    "rejected-expired",
    "rejected-refused",
    "silent",
    "timed-out-acked",
    "timed-out-not-started",
    "unanswered-acked",
    "unanswered-never-acked",
    "dispatch-failed",
    "retry-due",
    "deadline",
    "late",
    "finished",
    "resume",
    "cancel",
    "cancel-during-rollback",
    "cancel-again",
    "pause",
    "resume-paused",
    "rollback-paused",
    "pause-expired",
    "reopen-rollback",
    "queue",
    "slot-ask",
    "slot-granted",
    "slot-wait",
    "deadline-waiting",
];

#[cfg(test)]
thread_local! {
    pub(crate) static COVERED: std::cell::RefCell<std::collections::BTreeSet<&'static str>> =
        const { std::cell::RefCell::new(std::collections::BTreeSet::new()) };
}

/// Notes that the machine took decision `name` (counted in tests only).
#[inline]
fn decided(name: &'static str) {
    #[cfg(test)]
    {
        debug_assert!(DECISIONS.contains(&name), "{name} is not in DECISIONS");
        COVERED.with(|c| c.borrow_mut().insert(name));
    }
    let _ = name;
}

/// What can happen to a run.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// The run's actor started.
    Start,
    /// A worker (or the in-process bus) answered an attempt.
    Outcome { command_id: Uuid, attempt: u32, kind: CommandKind, result: OutcomeResult },
    /// A worker acknowledged a command: its handler started.
    Acked { command_id: Uuid, worker: String },
    /// The ack window passed with no ack: nobody started the command.
    NotTaken { command_id: Uuid },
    /// After a takeover, no live worker answered the inquiry about the
    /// command in flight.
    Unanswered { command_id: Uuid },
    /// The worker that acked the command stopped heartbeating.
    Silent { command_id: Uuid },
    /// The attempt's deadline (plus grace) passed without an outcome.
    TimedOut { command_id: Uuid, reason: String },
    /// A worker refused the command without running it.
    Rejected { command_id: Uuid, code: String, message: String },
    /// The command could not be sent at all.
    DispatchFailed { command_id: Uuid, retryable: bool, message: String },
    /// The delay before a retry is over.
    RetryDue { command_id: Uuid },
    /// The run's own deadline passed.
    DeadlineExceeded,
    /// A heartbeat of the worker holding a command.
    Heartbeat { command_id: Uuid },
    /// The run was taken over (or its coordinator restarted): pick it up
    /// where its record says it stands.
    Resume,
    /// An operator acted on the run (checked first with [`Machine::refusal`]).
    Control(OperatorAction),
    /// A paused run's pause timeout passed.
    PauseExpired,
    /// An operator resumes the rollback of a run that ended `compensation_failed`.
    Reopen(OperatorAction),
    /// The store answered about a slot the run asked for: held now, or
    /// waiting for it (in which case `Slot { granted: true }` follows once
    /// it is held).
    Slot { slot: String, granted: bool },
}

/// Bounds the machine enforces, from the bus and store it runs over. The
/// one place liveness is defined: the machine turns it into timers
/// ([`Effect::Watch`], [`Effect::Alive`]) and reads their expiry as events.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The run's input and step outputs together, in bytes.
    pub(crate) max_payload_bytes: usize,
    /// How attempts are watched; `Local` for in-process handlers.
    pub(crate) liveness: Liveness,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_payload_bytes: DEFAULT_MAX_RUN_PAYLOAD, liveness: Liveness::Local }
    }
}

/// What one event decided: the transitions to store, then the effects to
/// carry out, in order.
#[derive(Debug, Default)]
pub(crate) struct Decision {
    pub(crate) transitions: Vec<Transition>,
    pub(crate) effects: Vec<Effect>,
}

impl Decision {
    /// Only who started the attempt changed: nothing follows from it that must
    /// wait for the store (it matters to a coordinator taking the run over),
    /// so it may be written with the next batch.
    pub(crate) fn can_wait_to_be_written(&self) -> bool {
        !self.transitions.is_empty()
            && self.transitions.iter().all(|t| matches!(t, Transition::AttemptAcked { .. }))
    }
}

/// What the machine asks its actor to do, once the transitions of the same
/// decision are stored. The actor carries them out and decides nothing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Send an attempt's command to the step's workers.
    Send(StepCommand),
    /// Ask every worker of the step whether one holds this command.
    Inquire(StepCommand),
    /// Watch the attempt in flight: without an ack within `ack`, `NotTaken`
    /// (`Unanswered` for an inquiry) follows; without an outcome within
    /// `deadline`, `TimedOut`.
    Watch { command_id: Uuid, ack: Duration, inquiry: bool, deadline: Option<Duration> },
    /// The attempt's worker is alive: without a heartbeat within `within`,
    /// `Silent` follows.
    Alive { command_id: Uuid, within: Duration },
    /// The attempt is over or replaced: drop its timers.
    Unwatch { command_id: Uuid },
    /// `RetryDue` after `delay`.
    RetryAfter { command_id: Uuid, delay: Duration },
    /// `DeadlineExceeded` after `after`.
    RunDeadline { after: Duration },
    /// `PauseExpired` after `after`.
    PauseDeadline { after: Duration },
    /// Ask the store for a slot; its answer comes back as `Event::Slot`.
    Acquire { slot: String, limit: u32 },
    /// Wait until the store says the slot is held (`Event::Slot`, granted).
    AwaitSlot { slot: String },
    /// Let go of a step's slot (its attempt is over).
    Release { slot: String },
    /// Tell every worker of the command's step to stop it (whoever holds it
    /// drops its handler; nobody starts it any more).
    Cancel(StepCommand),
    /// Tell the observers: spans, hooks, run events and metrics all derive
    /// from this one notice, so they never disagree.
    Notify(Notice),
    /// The run is over: hand out its report and stop.
    Finish { duration: Duration },
}

/// Something an observer of the run wants to know.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Notice {
    /// The attempt in flight, picked up after a takeover (observers that
    /// track attempts open it again; it is not a new start).
    AttemptResumed {
        step: u32,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
    },
    AttemptStarted {
        step: u32,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
    },
    Redispatched {
        command_id: Uuid,
        note: String,
    },
    Late {
        command_id: Uuid,
        outcome: String,
    },
    Retry {
        step: u32,
        kind: CommandKind,
        attempt: u32,
        error: String,
        delay: Duration,
        unknown: bool,
    },
    StepCompleted {
        step: u32,
        attempt: u32,
        duration: Duration,
    },
    StepFailed {
        step: u32,
        attempt: u32,
        error: String,
        maybe_done: bool,
    },
    CompensationCompleted {
        step: u32,
        attempt: u32,
        duration: Duration,
    },
    CompensationFailed {
        step: u32,
        attempt: u32,
        error: String,
    },
    Cancelled {
        by: String,
        reason: Option<String>,
    },
    /// An attempt in flight or waiting was stopped (a cancel, or a sibling
    /// in its parallel group failed for good).
    Stopped {
        step: u32,
        kind: CommandKind,
        maybe_done: bool,
    },
    Paused {
        step: u32,
        kind: CommandKind,
        error: String,
    },
    Operator {
        action: ControlAction,
        by: String,
    },
}

/// Default limit of a run's input and outputs together: what fits in one
/// command (NATS' default 1 MiB message) and one stored record, with room
/// for the rest of the record.
pub const DEFAULT_MAX_RUN_PAYLOAD: usize = 768 * 1024;

/// Longest error text kept per step (workers' messages are cut there).
const MAX_ERROR_LEN: usize = 2048;

pub(crate) struct Machine {
    pub(crate) plan: Arc<FlowPlan>,
    /// Shared with the store that holds it; changed copy-on-write.
    pub(crate) rec: Arc<RunRecord>,
    pub(crate) run_started: Instant,
    /// Shared by the runs of a coordinator (they are the bus's).
    pub(crate) limits: Arc<Limits>,
    /// Monotonic start of each step's first action attempt and first
    /// compensation attempt, from `run_started`.
    first_attempt: Box<[(Mark, Mark)]>,
    entropy: Entropy,
    /// The wall clock of the event being handled.
    wall: SystemTime,
    /// Attempts about which every replica was asked because their worker
    /// went silent, or no ack came, with why: the answer may still come (a
    /// worker that lost its connection for a moment lost its outcome with
    /// it, and answers again from its cache).
    asked: Vec<(Uuid, String)>,
}

/// An instant kept as signed nanoseconds from an origin (the run's start),
/// or none: half the room of an `Option<Instant>` (a run keeps two per step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark(i64);

impl Mark {
    const NONE: Mark = Mark(i64::MIN);

    fn of(t: Option<Instant>, origin: Instant) -> Mark {
        let nanos = |d: Duration| d.as_nanos().min(i64::MAX as u128) as i64;
        match t {
            None => Mark::NONE,
            Some(t) if t >= origin => Mark(nanos(t - origin)),
            // Never `i64::MIN`: that is none.
            Some(t) => Mark(-nanos(origin - t)),
        }
    }

    fn get(self, origin: Instant) -> Option<Instant> {
        match self.0 {
            i64::MIN => None,
            n if n >= 0 => Some(origin + Duration::from_nanos(n as u64)),
            n => Some(origin.checked_sub(Duration::from_nanos(n.unsigned_abs())).unwrap_or(origin)),
        }
    }
}

impl Machine {
    pub(crate) fn new(
        plan: Arc<FlowPlan>,
        rec: Arc<RunRecord>,
        limits: Arc<Limits>,
        now: Instant,
        entropy: Entropy,
    ) -> Self {
        let n = rec.steps.len();
        Machine {
            plan,
            rec,
            run_started: now,
            limits,
            first_attempt: vec![(Mark::NONE, Mark::NONE); n].into_boxed_slice(),
            entropy,
            wall: SystemTime::UNIX_EPOCH,
            asked: Vec::new(),
        }
    }

    /// A machine for a run read back from the store: its clocks are rebuilt
    /// from the record's wall-clock times.
    pub(crate) fn resumed(
        plan: Arc<FlowPlan>,
        rec: Arc<RunRecord>,
        limits: Arc<Limits>,
        now: Instant,
        wall: SystemTime,
        entropy: Entropy,
    ) -> Self {
        let ago = |t: SystemTime| {
            now.checked_sub(wall.duration_since(t).unwrap_or_default()).unwrap_or(now)
        };
        let mut m = Machine::new(plan, rec, limits, now, entropy);
        m.run_started = ago(m.rec.started_at);
        let origin = m.run_started;
        for (slot, step) in m.first_attempt.iter_mut().zip(&m.rec.steps) {
            slot.0 = Mark::of(step.started_at().map(ago), origin);
            if step.compensation.is_some() {
                slot.1 = Mark::of(Some(now), origin);
            }
        }
        m
    }

    /// Why the record cannot be run by this flow, if so: a record written for
    /// another shape of the flow (steps added, removed or renamed since).
    pub(crate) fn mismatch(plan: &FlowPlan, rec: &RunRecord) -> Option<String> {
        let have: Vec<&str> = plan.def.steps.iter().map(|s| &*s.name).collect();
        let was: Vec<&str> = rec.steps.iter().map(|s| &*s.name).collect();
        let groups = plan.def.steps.iter().map(|s| &s.group).eq(rec.steps.iter().map(|s| &s.group));
        (have != was || !groups).then(|| {
            format!(
                "the run was started with steps [{}] but flow `{}` now has [{}]",
                was.join(", "),
                plan.def.name,
                have.join(", ")
            )
        })
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.rec.phase == Phase::Finished
    }

    /// Why an operator's action cannot be applied now, if so.
    pub(crate) fn refusal(&self, action: &OperatorAction) -> Option<String> {
        match action.action {
            // Cancelling a cancelled run again is harmless.
            ControlAction::Cancel
                if self.is_finished() && self.rec.status != RunStatus::Cancelled =>
            {
                Some(format!("run {} already finished: {}", self.rec.run_id, self.rec.status))
            }
            ControlAction::Cancel => match &self.rec.extras().paused {
                Some(p) if p.kind == CommandKind::Compensate => Some(format!(
                    "run {} is already rolling back and paused at the compensation of `{}`: use resume or rollback",
                    self.rec.run_id,
                    self.rec.steps.get(p.step as usize).map_or("?", |s| &*s.name)
                )),
                _ => None,
            },
            // A failed rollback is resumed by reopening the run (`Event::Reopen`).
            ControlAction::Resume if self.rec.status == RunStatus::CompensationFailed => None,
            ControlAction::Resume | ControlAction::Rollback
                if self.rec.extras().paused.is_none() =>
            {
                Some(format!("run {} is not paused (it is {})", self.rec.run_id, self.rec.status))
            }
            ControlAction::Resume | ControlAction::Rollback => None,
        }
    }

    /// A new run's first decision, taken before the run is first written
    /// (the record then written holds its transitions): the actor carries
    /// it out as if it had just been stored, after [`Machine::restamp`].
    pub(crate) fn start_decision(&mut self, now: Instant, wall: SystemTime) -> Decision {
        let mut decision = Decision::default();
        self.handle(Event::Start, now, wall, &mut decision);
        decision
    }

    /// Builds the commands of `effects` again as of `wall`: a decision
    /// carried out a while after it was taken (the run's creation came in
    /// between) still gives a worker its whole ack window and the step its
    /// whole time, counted from the send.
    pub(crate) fn restamp(&mut self, effects: &mut [Effect], wall: SystemTime) {
        self.wall = wall;
        for effect in effects {
            if let Effect::Send(cmd) = effect {
                *cmd = self.command(cmd.step_index, cmd.kind, cmd.attempt, cmd.command_id);
            }
        }
    }

    /// Decides what `event` means and appends the resulting transitions to `out`.
    pub(crate) fn handle(
        &mut self,
        event: Event,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        if let Event::Reopen(action) = event {
            self.wall = wall;
            return self.reopen(action, now, wall, out);
        }
        if self.is_finished() {
            return;
        }
        self.wall = wall;
        match event {
            Event::Start => {
                if self.rec.current.is_empty()
                    && self.rec.steps.iter().all(|s| s.status == StepStatus::NotRun)
                {
                    decided("start");
                    self.run_deadline(now, out);
                    self.first_stage(now, wall, out);
                }
            }
            Event::Resume => {
                decided("resume");
                self.run_deadline(now, out);
                // Every attempt in flight (several in a parallel group).
                for c in self.rec.current.clone() {
                    match c.retry_at {
                        // Not simply sent again (another replica would run it a
                        // second time): ask who holds it; nobody answering
                        // means never started, or a worker gone (the ack says).
                        None => {
                            let notice = Notice::AttemptResumed {
                                step: c.step,
                                kind: c.kind,
                                attempt: c.attempt,
                                command_id: c.command_id,
                            };
                            out.effects.push(Effect::Notify(notice));
                            match self.limits.liveness {
                                // Never acked: the previous owner may still
                                // send the command (it learns of the takeover
                                // only at its next write), and an inquiry that
                                // crosses it on its way finds nobody holding it
                                // while a worker is about to. Its start-by time
                                // is at most an ack window from now, so asked
                                // once that has passed (`NotTaken` asks), a
                                // worker holds it or none ever will.
                                Liveness::Remote { ack_timeout, clock_skew, .. }
                                    if c.acked_by.is_none() =>
                                {
                                    let cmd = self.command(c.step, c.kind, c.attempt, c.command_id);
                                    out.effects.push(Effect::Watch {
                                        command_id: c.command_id,
                                        ack: ack_timeout + clock_skew,
                                        inquiry: false,
                                        deadline: self.deadline_in(&cmd),
                                    });
                                    self.asking(c.command_id, "sent again after a takeover".into());
                                }
                                _ => self.inquire(&c, out),
                            }
                        }
                        // A scheduled retry waits out what is left of its delay.
                        Some(r) => {
                            let delay = r.at.duration_since(wall).unwrap_or_default();
                            out.effects
                                .push(Effect::RetryAfter { command_id: c.command_id, delay });
                        }
                    }
                }
                // Attempts waiting for their step's slot, and a queued run, ask
                // again (harmless: the store knows them).
                for w in self.rec.extras().slot_waits.clone() {
                    let limit = self.step_limit(w.step).unwrap_or(1);
                    out.effects.push(Effect::Acquire { slot: w.slot, limit });
                }
                if self.rec.status == RunStatus::Queued {
                    let (slot, limit) = self.key_slot().unwrap_or_default();
                    out.effects.push(Effect::Acquire { slot, limit });
                } else if self.rec.current.is_empty() && self.rec.extras().slot_waits.is_empty() {
                    if self.rec.steps.iter().all(|s| s.status == StepStatus::NotRun) {
                        self.first_stage(now, wall, out)
                    } else if let Some(until) =
                        self.rec.extras().paused.as_ref().and_then(|p| p.until)
                    {
                        // Paused: wait on, and roll back when the pause times out.
                        let after = until.duration_since(wall).unwrap_or_default();
                        out.effects.push(Effect::PauseDeadline { after });
                    }
                }
            }
            Event::Heartbeat { command_id } => self.alive(command_id, out),
            Event::Outcome { command_id, attempt, kind, result } => {
                // An answer of the wrong kind (a compensation's for an action)
                // is not this attempt's: noted, not applied.
                let Some(cur) = self.in_flight(command_id).filter(|c| c.kind == kind) else {
                    self.late(command_id, attempt, kind, &result, wall, out);
                    return;
                };
                match result {
                    OutcomeResult::Completed { output } => {
                        self.completed(cur, output, now, wall, out)
                    }
                    OutcomeResult::Failed(f) if f.maybe_done => {
                        self.unknown(cur, f.message, now, wall, out)
                    }
                    OutcomeResult::Failed(f) => {
                        self.attempt_failed(cur, f.message, f.retryable, false, now, wall, out)
                    }
                }
            }
            Event::Acked { command_id, worker } => match self.in_flight(command_id) {
                Some(c) if c.acked_by.is_none() => {
                    decided("acked");
                    self.push(Transition::AttemptAcked { command_id, worker }, out);
                }
                // Acked again (an inquiry's answer): the worker is alive.
                Some(_) => self.alive(command_id, out),
                None => {}
            },
            Event::NotTaken { command_id } => {
                if let Some(cur) = self.in_flight(command_id).filter(|c| c.acked_by.is_none()) {
                    // No ack is not proof that nobody started it: an ack
                    // travels at most once, and one held up in a frozen
                    // node, or lost with a route, arrives late or never.
                    // The command's start-by time has passed, so whoever
                    // holds it now is all there will be: ask them first,
                    // and send it again only if nobody answers.
                    decided("not-taken");
                    self.inquire(&cur, out);
                    // (A resumed attempt keeps its reason.)
                    if !self.asked.iter().any(|(id, _)| *id == command_id) {
                        let why = "no worker took the command in time".to_owned();
                        self.asked.push((command_id, why));
                    }
                }
            }
            Event::Unanswered { command_id } => {
                let Some(cur) = self.in_flight(command_id) else { return };
                let silent = self.asked.iter().position(|(id, _)| *id == command_id);
                let silent = silent.map(|i| self.asked.swap_remove(i).1);
                match cur.acked_by.clone() {
                    Some(worker) => {
                        decided("unanswered-acked");
                        let why = match silent {
                            Some(reason) => format!("{reason}, and no worker answered when asked"),
                            None => format!(
                                "worker {worker} held the command and is gone (no answer after the run was taken over)"
                            ),
                        };
                        self.unknown(cur, why, now, wall, out)
                    }
                    // Nobody ever started it, and no live worker holds it: send it again.
                    None => {
                        decided("unanswered-never-acked");
                        let why =
                            silent.unwrap_or_else(|| "sent again after a takeover".to_owned());
                        self.redispatch_or_fail(cur, why, now, wall, out)
                    }
                }
            }
            Event::Silent { command_id } => {
                if let Some(cur) = self.in_flight(command_id).filter(|c| c.acked_by.is_some()) {
                    let reason = self.silence(cur.acked_by.as_deref());
                    // Not concluded yet: heartbeats and the outcome travel at
                    // most once, and a worker whose connection moved to another
                    // node may have lost them. Whoever holds the command
                    // answers the inquiry (its outcome from cache, or an ack
                    // if still running); nobody answering makes it unknown.
                    decided("silent");
                    self.inquire(&cur, out);
                    self.asking(command_id, reason);
                }
            }
            Event::TimedOut { command_id, reason } => {
                let Some(cur) = self.in_flight(command_id) else { return };
                if cur.acked_by.is_some() {
                    decided("timed-out-acked");
                    self.unknown(cur, reason, now, wall, out);
                } else {
                    decided("timed-out-not-started");
                    // Workers do not start a command past its deadline: nothing ran.
                    let why = format!("{reason}; no worker started it");
                    self.attempt_failed(cur, why, true, false, now, wall, out);
                }
            }
            Event::Rejected { command_id, code, message } => {
                let Some(cur) = self.in_flight(command_id).filter(|c| c.acked_by.is_none()) else {
                    return;
                };
                if code == WireError::CODE_EXPIRED {
                    decided("rejected-expired");
                    self.redispatch_or_fail(cur, message, now, wall, out);
                } else {
                    decided("rejected-refused");
                    let why = format!("the worker refused the command ({code}): {message}");
                    self.attempt_failed(cur, why, false, false, now, wall, out);
                }
            }
            Event::DispatchFailed { command_id, retryable, message } => {
                if let Some(cur) = self.in_flight(command_id) {
                    decided("dispatch-failed");
                    self.attempt_failed(cur, message, retryable, false, now, wall, out);
                }
            }
            Event::RetryDue { command_id } => {
                let due = self
                    .rec
                    .current
                    .iter()
                    .find(|c| c.command_id == command_id && c.retry_at.is_some())
                    .map(|c| (c.step, c.kind, c.attempt));
                if let Some((step, kind, attempt)) = due {
                    decided("retry-due");
                    self.begin(step, kind, attempt + 1, now, wall, out);
                }
            }
            Event::Control(action) => self.control(action, now, wall, out),
            Event::Reopen(_) => {}
            Event::Slot { slot, granted: false } => {
                // Still wanted (not cancelled or expired meanwhile): wait for it.
                let queued = self.rec.status == RunStatus::Queued
                    && self.key_slot().is_some_and(|(k, _)| k == slot);
                if queued || self.rec.extras().slot_waits.iter().any(|w| w.slot == slot) {
                    decided("slot-wait");
                    out.effects.push(Effect::AwaitSlot { slot });
                }
            }
            Event::Slot { slot, granted: true } => {
                let queued = self.rec.status == RunStatus::Queued
                    && self.key_slot().is_some_and(|(k, _)| k == slot);
                let waits: Vec<_> = self
                    .rec
                    .extras()
                    .slot_waits
                    .iter()
                    .filter(|w| w.slot == slot)
                    .cloned()
                    .collect();
                if !queued && waits.is_empty() {
                    // Not wanted any more (cancelled meanwhile): let it go.
                    if self.rec.extras().slots.contains(&slot) {
                        out.effects.push(Effect::Release { slot });
                    }
                    return;
                }
                decided("slot-granted");
                self.push(Transition::SlotTaken { slot }, out);
                if queued {
                    self.next_step(0, now, wall, out);
                }
                for w in waits {
                    self.begin_now(w.step, CommandKind::Execute, w.attempt, now, wall, out);
                }
            }
            Event::PauseExpired => {
                let Some(p) = &self.rec.extras().paused else { return };
                if p.until.is_none_or(|u| u > wall) {
                    return; // resumed meanwhile, or not due yet
                }
                decided("pause-expired");
                let action = OperatorAction {
                    action: ControlAction::Rollback,
                    by: "pause timeout".into(),
                    reason: None,
                    at: wall,
                };
                self.roll_back_paused(action, now, wall, out);
            }
            Event::DeadlineExceeded => {
                if self.rec.phase != Phase::Executing {
                    return; // compensation is never cut short
                }
                let timeout = self.rec.extras().timeout.unwrap_or_default();
                if self.rec.status == RunStatus::Queued {
                    decided("deadline-waiting");
                    let error = format!(
                        "run deadline of {timeout:?} exceeded while queued behind other runs with its concurrency key"
                    );
                    self.push(Transition::Expired { error }, out);
                    return self.finish(now, out);
                }
                if self.rec.current.is_empty()
                    && let Some(w) = self.rec.extras().slot_waits.first().cloned()
                {
                    decided("deadline-waiting");
                    let error = format!(
                        "run deadline of {timeout:?} exceeded while waiting for a slot of the step"
                    );
                    let cur = Current {
                        step: w.step,
                        kind: CommandKind::Execute,
                        attempt: w.attempt,
                        command_id: Uuid::nil(),
                        retry_at: None,
                        acked_by: None,
                        sent_at: None,
                        redispatches: 0,
                    };
                    return self.step_failed(cur, error, false, now, wall, out);
                }
                if self.rec.extras().paused.is_some() {
                    decided("deadline");
                    let timeout = self.rec.extras().timeout.unwrap_or_default();
                    let action = OperatorAction {
                        action: ControlAction::Rollback,
                        by: format!("run deadline of {timeout:?}"),
                        reason: None,
                        at: wall,
                    };
                    return self.roll_back_paused(action, now, wall, out);
                }
                // The first attempt of the stage fails; its siblings are stopped.
                if let Some(cur) = self.rec.current.first().cloned() {
                    decided("deadline");
                    let timeout = self.rec.extras().timeout.unwrap_or_default();
                    let error = format!("run deadline of {timeout:?} exceeded");
                    // An attempt in a worker's hands (or an in-process
                    // handler running) is stopped at the same deadline:
                    // whatever it did is unknown.
                    let started = cur.acked_by.is_some() || self.limits.liveness == Liveness::Local;
                    let unknown = cur.retry_at.is_none() && started;
                    self.step_failed(cur, error, unknown, now, wall, out);
                }
            }
        }
    }

    fn control(
        &mut self,
        action: OperatorAction,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        match action.action {
            ControlAction::Cancel => {
                if self.rec.extras().actions.iter().any(|a| a.action == ControlAction::Cancel) {
                    decided("cancel-again");
                    return; // harmless
                }
                if self.rec.phase != Phase::Executing {
                    // Already rolling back: recorded, and the rollback goes on.
                    decided("cancel-during-rollback");
                    self.push(Transition::Cancelled { action }, out);
                    return;
                }
                decided("cancel");
                let paused = self.rec.extras().paused.as_ref().map(|p| p.step);
                let stage = (self.rec.current.first().map(|c| c.step))
                    .or(self.rec.extras().slot_waits.first().map(|w| w.step))
                    .or(paused)
                    .map(|step| self.plan.def.stage_of(step as usize));
                self.push(Transition::Cancelled { action }, out);
                // A paused step surely did not happen since its last failure.
                if let Some(step) = paused {
                    self.push(Transition::Stopped { step, maybe_done: false }, out);
                }
                self.stop_all(out);
                let below = stage.map_or(self.rec.steps.len(), |s| s.end);
                self.next_compensation(below, now, wall, out);
            }
            ControlAction::Resume => {
                let Some(p) = self.rec.extras().paused.clone() else { return };
                decided("resume-paused");
                self.push(Transition::Resumed { action }, out);
                // A fresh budget: attempts and the retry window count from now.
                let origin = self.run_started;
                if let Some(slot) = self.first_attempt.get_mut(p.step as usize) {
                    match p.kind {
                        CommandKind::Execute => slot.0 = Mark::of(Some(now), origin),
                        CommandKind::Compensate => slot.1 = Mark::of(Some(now), origin),
                    }
                }
                let last = self.attempts_of(p.step, p.kind);
                self.begin(p.step, p.kind, last + 1, now, wall, out);
            }
            ControlAction::Rollback => {
                if self.rec.extras().paused.is_none() {
                    return;
                }
                decided("rollback-paused");
                self.roll_back_paused(action, now, wall, out);
            }
        }
    }

    /// Resumes the rollback of a run that ended `compensation_failed`.
    fn reopen(
        &mut self,
        action: OperatorAction,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        if !(self.is_finished() && self.rec.status == RunStatus::CompensationFailed) {
            return;
        }
        decided("reopen-rollback");
        self.push(Transition::Reopened { action }, out);
        let origin = self.run_started;
        for slot in &mut self.first_attempt {
            if slot.1.get(origin).is_some() {
                slot.1 = Mark::of(Some(now), origin);
            }
        }
        self.next_compensation(self.rec.steps.len(), now, wall, out);
    }

    /// Attempts made so far of a step's action or compensation.
    fn attempts_of(&self, step: u32, kind: CommandKind) -> u32 {
        let Some(s) = self.rec.steps.get(step as usize) else { return 0 };
        match kind {
            CommandKind::Execute => s.attempts,
            CommandKind::Compensate => s.compensation.as_ref().map_or(0, |c| c.attempts),
        }
    }

    /// Attempts of the current budget (they count from the last resume).
    fn budget_used(&self, step: u32, kind: CommandKind, attempt: u32) -> u32 {
        let base = self.rec.steps.get(step as usize).map_or(0, |s| match kind {
            CommandKind::Execute => s.extras().retry_base,
            CommandKind::Compensate => s.extras().compensation_retry_base,
        });
        attempt.saturating_sub(base)
    }

    /// A paused run rolls back: its step fails for good with the error it
    /// paused on (a paused compensation counts as failed).
    fn roll_back_paused(
        &mut self,
        action: OperatorAction,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let Some(p) = self.rec.extras().paused.clone() else { return };
        let error = format!("{} (rolled back by {})", p.error, action.by);
        self.push(Transition::RolledBack { action }, out);
        let cur = Current {
            step: p.step,
            kind: p.kind,
            attempt: self.attempts_of(p.step, p.kind),
            command_id: Uuid::nil(),
            retry_at: None,
            acked_by: None,
            sent_at: None,
            redispatches: 0,
        };
        self.step_failed(cur, error, false, now, wall, out);
    }

    /// The step's retries ran out and it is set to pause: wait for an operator.
    fn pause(&mut self, cur: &Current, error: String, wall: SystemTime, out: &mut Decision) {
        decided("pause");
        let timeout = self.plan.def.steps.get(cur.step as usize).and_then(|s| s.pause_timeout);
        let pause = PauseRecord {
            step: cur.step,
            kind: cur.kind,
            error,
            since: wall,
            until: timeout.and_then(|t| wall.checked_add(t)),
        };
        self.push(Transition::Paused(pause), out);
    }

    /// The attempt `command_id` if it is the one in flight (not a stale or
    /// duplicate answer, and not one already failed and waiting for its retry).
    fn in_flight(&self, command_id: Uuid) -> Option<Current> {
        self.rec
            .current
            .iter()
            .find(|c| c.command_id == command_id && c.retry_at.is_none())
            .cloned()
    }

    /// Stops every attempt in flight or waiting for its retry: one sent and
    /// not answered may have happened (its ack can be on the way), and its
    /// workers are told to stop it; one between attempts surely did not.
    fn stop_all(&mut self, out: &mut Decision) {
        for w in self.rec.extras().slot_waits.clone() {
            self.push(Transition::Stopped { step: w.step, maybe_done: false }, out);
        }
        for c in self.rec.current.clone() {
            let in_hand = c.retry_at.is_none();
            self.push(Transition::Stopped { step: c.step, maybe_done: in_hand }, out);
            if in_hand {
                out.effects.push(Effect::Cancel(self.command(
                    c.step,
                    c.kind,
                    c.attempt,
                    c.command_id,
                )));
            }
        }
    }

    fn push(&mut self, t: Transition, out: &mut Decision) {
        // The attempts in flight before this transition (a retry's notice
        // names the attempt that failed).
        let before = self.rec.current.clone();
        Arc::make_mut(&mut self.rec).apply(&t);
        self.effects_of(&t, &before, out);
        out.transitions.push(t);
    }

    /// What follows from a transition once it is stored.
    fn effects_of(&self, t: &Transition, before: &[Current], out: &mut Decision) {
        let fx = &mut out.effects;
        let attempts = |step: u32| self.attempts_of(step, CommandKind::Execute);
        let comp_attempts = |step: u32| self.attempts_of(step, CommandKind::Compensate);
        // An attempt of a step with a limit that is over (or stopped, or
        // never started) lets go of the step's slot.
        let over = match t {
            Transition::StepCompleted { step, .. }
            | Transition::StepFailed { step, .. }
            | Transition::Stopped { step, .. }
            | Transition::RetryScheduled { step, kind: CommandKind::Execute, .. } => Some(*step),
            Transition::Paused(p) if p.kind == CommandKind::Execute => Some(p.step),
            _ => None,
        };
        if let Some(step) = over
            && self.step_limit(step).is_some()
        {
            let slot = self.step_slot(step);
            if self.rec.extras().slots.contains(&slot) {
                fx.push(Effect::Release { slot });
            }
        }
        // An attempt watched before and not after (over, failed, replaced)
        // loses its timers.
        for b in before.iter().filter(|b| b.retry_at.is_none()) {
            let still = self
                .rec
                .current
                .iter()
                .any(|c| c.command_id == b.command_id && c.retry_at.is_none());
            if !still {
                fx.push(Effect::Unwatch { command_id: b.command_id });
            }
        }
        match t {
            Transition::AttemptStarted { step, kind, attempt, command_id, .. } => {
                let notice = Notice::AttemptStarted {
                    step: *step,
                    kind: *kind,
                    attempt: *attempt,
                    command_id: *command_id,
                };
                fx.push(Effect::Notify(notice));
                self.send(*step, *kind, *attempt, *command_id, fx);
            }
            Transition::Redispatched { command_id, note, .. } => {
                let notice = Notice::Redispatched { command_id: *command_id, note: note.clone() };
                fx.push(Effect::Notify(notice));
                if let Some(c) = self.rec.current.iter().find(|c| c.command_id == *command_id) {
                    self.send(c.step, c.kind, c.attempt, *command_id, fx);
                }
            }
            Transition::AttemptAcked { command_id, .. } => self.alive_effect(*command_id, fx),
            Transition::LateOutcome(note) => {
                let notice =
                    Notice::Late { command_id: note.command_id, outcome: note.outcome.clone() };
                fx.push(Effect::Notify(notice));
            }
            Transition::RetryScheduled { step, kind, error, retry, unknown } => {
                let Some(c) = before.iter().find(|c| c.step == *step) else { return };
                let notice = Notice::Retry {
                    step: *step,
                    kind: *kind,
                    attempt: c.attempt,
                    error: error.clone(),
                    delay: retry.delay,
                    unknown: *unknown,
                };
                fx.push(Effect::Notify(notice));
                fx.push(Effect::RetryAfter { command_id: c.command_id, delay: retry.delay });
            }
            Transition::StepCompleted { step, duration, .. } => {
                let notice = Notice::StepCompleted {
                    step: *step,
                    attempt: attempts(*step),
                    duration: *duration,
                };
                fx.push(Effect::Notify(notice));
            }
            Transition::StepFailed { step, error, maybe_done, .. } => {
                let notice = Notice::StepFailed {
                    step: *step,
                    attempt: attempts(*step),
                    error: error.clone(),
                    maybe_done: *maybe_done,
                };
                fx.push(Effect::Notify(notice));
            }
            Transition::CompensationCompleted { step, duration } => {
                let notice = Notice::CompensationCompleted {
                    step: *step,
                    attempt: comp_attempts(*step),
                    duration: *duration,
                };
                fx.push(Effect::Notify(notice));
            }
            Transition::CompensationFailed { step, error, .. } => {
                let notice = Notice::CompensationFailed {
                    step: *step,
                    attempt: comp_attempts(*step),
                    error: error.clone(),
                };
                fx.push(Effect::Notify(notice));
            }
            Transition::Paused(p) => {
                let notice = Notice::Paused { step: p.step, kind: p.kind, error: p.error.clone() };
                fx.push(Effect::Notify(notice));
                if let Some(until) = p.until {
                    let after = until.duration_since(self.wall).unwrap_or_default();
                    fx.push(Effect::PauseDeadline { after });
                }
            }
            Transition::Resumed { action }
            | Transition::RolledBack { action }
            | Transition::Reopened { action } => {
                let notice = Notice::Operator { action: action.action, by: action.by.clone() };
                fx.push(Effect::Notify(notice));
            }
            Transition::Cancelled { action } => {
                let notice =
                    Notice::Cancelled { by: action.by.clone(), reason: action.reason.clone() };
                fx.push(Effect::Notify(notice));
            }
            Transition::Stopped { step, maybe_done } => {
                let Some(c) = before.iter().find(|c| c.step == *step) else { return };
                let notice = Notice::Stopped { step: *step, kind: c.kind, maybe_done: *maybe_done };
                fx.push(Effect::Notify(notice));
            }
            Transition::Finished { duration, .. } => {
                fx.push(Effect::Finish { duration: *duration })
            }
            Transition::SlotAsked { .. }
            | Transition::SlotTaken { .. }
            | Transition::Expired { .. } => {}
        }
    }

    /// The command of an attempt, and its watch.
    fn send(
        &self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
        fx: &mut Vec<Effect>,
    ) {
        let cmd = self.command(step, kind, attempt, command_id);
        let deadline = self.deadline_in(&cmd);
        fx.push(Effect::Send(cmd));
        if let Liveness::Remote { ack_timeout, clock_skew, .. } = self.limits.liveness {
            fx.push(Effect::Watch {
                command_id,
                ack: ack_timeout + clock_skew,
                inquiry: false,
                deadline,
            });
        }
    }

    /// A heartbeat or a repeated ack of the attempt in flight.
    /// Asks every worker of the attempt's step whether one holds its
    /// command; `Unanswered` follows if none does within the ack window.
    fn inquire(&self, c: &Current, out: &mut Decision) {
        let cmd = self.command(c.step, c.kind, c.attempt, c.command_id);
        let deadline = self.deadline_in(&cmd);
        out.effects.push(Effect::Inquire(cmd));
        if let Liveness::Remote { ack_timeout, clock_skew, .. } = self.limits.liveness {
            out.effects.push(Effect::Watch {
                command_id: c.command_id,
                ack: ack_timeout + clock_skew,
                inquiry: true,
                deadline,
            });
        }
    }

    /// Notes why every replica is asked about `command_id` (the reason the
    /// attempt is given up with if nobody answers), over any earlier one.
    fn asking(&mut self, command_id: Uuid, why: String) {
        self.asked.retain(|(id, _)| *id != command_id);
        self.asked.push((command_id, why));
    }

    fn alive(&self, command_id: Uuid, out: &mut Decision) {
        if self.in_flight(command_id).is_some() {
            self.alive_effect(command_id, &mut out.effects);
        }
    }

    fn alive_effect(&self, command_id: Uuid, fx: &mut Vec<Effect>) {
        let Liveness::Remote { heartbeat_timeout, .. } = self.limits.liveness else { return };
        fx.push(Effect::Alive { command_id, within: heartbeat_timeout });
    }

    /// Why an attempt's worker is taken for silent (said only when it is:
    /// formatting it for every heartbeat showed in the profiles).
    fn silence(&self, worker: Option<&str>) -> String {
        let worker = worker.unwrap_or_default();
        match self.limits.liveness {
            Liveness::Remote { heartbeat_timeout, .. } => {
                format!("worker {worker} went silent: no heartbeat for {heartbeat_timeout:?}")
            }
            Liveness::Local => format!("worker {worker} went silent"),
        }
    }

    /// When the run's own deadline is due, from its start.
    fn run_deadline(&self, now: Instant, out: &mut Decision) {
        if let Some(timeout) = self.rec.extras().timeout {
            let after = timeout.saturating_sub(now.saturating_duration_since(self.run_started));
            out.effects.push(Effect::RunDeadline { after });
        }
    }

    /// Time until an attempt's command is over for good (its deadline plus
    /// the grace for the worker's own report).
    fn deadline_in(&self, cmd: &StepCommand) -> Option<Duration> {
        let Liveness::Remote { timeout_grace, .. } = self.limits.liveness else { return None };
        let now = orchestrix_proto::time::unix_ms(self.wall);
        cmd.deadline_ms.map(|d| Duration::from_millis(d.saturating_sub(now)) + timeout_grace)
    }

    /// The command for an attempt. A worker may start it until `start_by`
    /// (the ack window); its handler then has `timeout`: the attempt is over
    /// by their sum, or at the run's deadline for an action (a compensation
    /// is never cut short by it). Counted from this send, not from when the
    /// attempt was decided: a command that waited on an unavailable store,
    /// or was sent again because nobody took it, gets its whole budget.
    pub(crate) fn command(
        &self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
    ) -> StepCommand {
        let def = &self.plan.def;
        let sdef = &def.steps[step as usize];
        let timeout = match kind {
            CommandKind::Execute => sdef.timeout,
            CommandKind::Compensate => sdef.compensation_timeout,
        };
        let rec = &self.rec;
        let now = self.wall;
        let ms = orchestrix_proto::time::unix_ms;
        let ack_window = match self.limits.liveness {
            Liveness::Remote { ack_timeout, .. } => Some(ack_timeout),
            _ => None,
        };
        let start_by_ms = ack_window.map(|a| ms(now + a));
        let step_end = timeout.map(|t| ms(now + ack_window.unwrap_or_default() + t));
        let run_end = match kind {
            CommandKind::Execute => rec.extras().timeout.map(|t| ms(rec.started_at + t)),
            CommandKind::Compensate => None,
        };
        let deadline_ms = match (step_end, run_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        StepCommand {
            command_id,
            run_id: rec.run_id,
            flow: def.name.clone(),
            version: self.plan.version.clone(),
            step: sdef.name.clone(),
            step_index: step,
            kind,
            attempt,
            input: rec.input.clone(),
            outputs: self.outputs_for(step as usize, kind),
            timeout,
            start_by_ms,
            deadline_ms,
            acks: false,
            sampled: None,
            traceparent: None,
        }
    }

    fn since_first(&self, step: usize, kind: CommandKind, now: Instant) -> Duration {
        let Some(&(exec, comp)) = self.first_attempt.get(step) else { return Duration::ZERO };
        let first = match kind {
            CommandKind::Execute => exec,
            CommandKind::Compensate => comp,
        };
        first.get(self.run_started).map(|t| now.saturating_duration_since(t)).unwrap_or_default()
    }

    /// An answer for an attempt the run gave up on (or a duplicate): noted
    /// once in the record, never applied.
    fn late(
        &mut self,
        command_id: Uuid,
        attempt: u32,
        kind: CommandKind,
        result: &OutcomeResult,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let noted = self.rec.extras().late.iter().any(|n| n.command_id == command_id);
        if noted || self.rec.extras().late.len() >= MAX_LATE_NOTES {
            return;
        }
        decided("late");
        let note = LateNote::new(command_id, attempt, kind, result, wall);
        self.push(Transition::LateOutcome(note), out);
    }

    fn begin(
        &mut self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        // A step with a limit of attempts in flight waits for a slot first
        // (its compensations do not: undoing is never held back).
        if kind == CommandKind::Execute
            && let Some(limit) = self.step_limit(step)
        {
            decided("slot-ask");
            let slot = self.step_slot(step);
            self.push(Transition::SlotAsked { slot: slot.clone(), step: Some(step), attempt }, out);
            out.effects.push(Effect::Acquire { slot, limit });
            return;
        }
        self.begin_now(step, kind, attempt, now, wall, out);
    }

    /// Starts the attempt: its command goes out once this is stored.
    fn begin_now(
        &mut self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let origin = self.run_started;
        if let Some(slot) = self.first_attempt.get_mut(step as usize) {
            let mark = match kind {
                CommandKind::Execute => &mut slot.0,
                CommandKind::Compensate => &mut slot.1,
            };
            if mark.get(origin).is_none() {
                *mark = Mark::of(Some(now), origin);
            }
        }
        let command_id = self.entropy.command_id();
        self.push(Transition::AttemptStarted { step, kind, attempt, command_id, at: wall }, out);
    }

    fn completed(
        &mut self,
        cur: Current,
        output: Payload,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let step = cur.step as usize;
        let duration = self.since_first(step, cur.kind, now);
        if cur.kind == CommandKind::Compensate {
            decided("compensated");
            self.push(Transition::CompensationCompleted { step: cur.step, duration }, out);
            self.compensation_over(step, now, wall, out);
            return;
        }
        // The handler ran: an output the run cannot keep still leaves its
        // effect behind, so the step fails as maybe done (and is compensated).
        if let Err(e) = output.validate() {
            decided("output-refused");
            let why = format!("the worker sent an output that is not valid MessagePack: {e}");
            return self.step_failed(cur, why, true, now, wall, out);
        }
        let held = self.rec.input.len()
            + self
                .rec
                .steps
                .iter()
                .filter_map(|s| s.output.as_ref())
                .map(Payload::len)
                .sum::<usize>();
        let max = self.limits.max_payload_bytes;
        if held + output.len() > max {
            decided("output-refused");
            let why = format!(
                "the step's output of {} bytes brings the run's input and outputs to {} bytes, over the limit of {max} bytes (keep large data in a store and pass a reference)",
                output.len(),
                held + output.len()
            );
            return self.step_failed(cur, why, true, now, wall, out);
        }
        decided("completed");
        self.push(Transition::StepCompleted { step: cur.step, output, duration }, out);
        // A parallel group moves on once every one of its steps completed.
        let stage = self.plan.def.stage_of(step);
        let done = self.rec.steps[stage.clone()].iter().all(|s| s.status == StepStatus::Completed);
        if done {
            self.next_step(stage.end, now, wall, out);
        }
    }

    /// Starts the run: its first stage, or first a place in the queue of its
    /// concurrency key.
    fn first_stage(&mut self, now: Instant, wall: SystemTime, out: &mut Decision) {
        match self.key_slot() {
            Some((slot, limit)) => {
                decided("queue");
                self.push(
                    Transition::SlotAsked { slot: slot.clone(), step: None, attempt: 0 },
                    out,
                );
                out.effects.push(Effect::Acquire { slot, limit });
            }
            None => self.next_step(0, now, wall, out),
        }
    }

    /// The slot of the run's concurrency key and the flow's limit per key.
    fn key_slot(&self) -> Option<(String, u32)> {
        let key = self.rec.extras().concurrency_key.as_deref()?;
        let limit = self.plan.def.concurrency_per_key.unwrap_or(1);
        Some((crate::slots::key_slot(&self.plan.def.name, key), limit))
    }

    /// The slot of a step's `max_in_flight`.
    fn step_slot(&self, step: u32) -> String {
        let name = self.plan.def.steps.get(step as usize).map_or("", |s| &*s.name);
        crate::slots::step_slot(&self.plan.def.name, name)
    }

    /// The step's limit of attempts in flight, if it has one.
    fn step_limit(&self, step: u32) -> Option<u32> {
        self.plan.def.steps.get(step as usize).and_then(|s| s.max_in_flight)
    }

    /// Starts the stage at `from` (every step of a parallel group at once),
    /// or finishes after the last.
    fn next_step(&mut self, from: usize, now: Instant, wall: SystemTime, out: &mut Decision) {
        if from < self.rec.steps.len() {
            for i in self.plan.def.stage_of(from) {
                self.begin(i as u32, CommandKind::Execute, 1, now, wall, out);
            }
        } else {
            self.finish(now, out);
        }
    }

    /// A compensation is over (done or failed for good): once the last of
    /// its stage is, the rollback goes on below the stage.
    fn compensation_over(
        &mut self,
        step: usize,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        if self.rec.current.is_empty() {
            let stage = self.plan.def.stage_of(step);
            self.next_compensation(stage.start, now, wall, out);
        }
    }

    /// Compensates the nearest stage below `below` (a stage boundary) with a
    /// step that completed (or may have) and has a compensation: every such
    /// step of it at once. Finishes when there is none.
    fn next_compensation(
        &mut self,
        below: usize,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let steps = &self.plan.def.steps;
        let due = |i: usize| {
            matches!(self.rec.steps[i].status, StepStatus::Completed | StepStatus::Unknown)
                && steps.get(i).is_some_and(|s| s.compensable)
        };
        let below = below.min(self.rec.steps.len());
        let Some(last) = (0..below).rev().find(|&i| due(i)) else {
            return self.finish(now, out);
        };
        let stage = self.plan.def.stage_of(last);
        let members: Vec<usize> = (stage.start..below.min(stage.end)).filter(|&i| due(i)).collect();
        for i in members {
            // Numbered on from a rollback resumed after it failed.
            let attempt = self.attempts_of(i as u32, CommandKind::Compensate) + 1;
            self.begin(i as u32, CommandKind::Compensate, attempt, now, wall, out);
        }
    }

    fn policy(&self, step: usize, kind: CommandKind) -> RetryPolicy {
        let Some(def) = self.plan.def.steps.get(step) else { return RetryPolicy::new() };
        match kind {
            CommandKind::Execute => def.retry.clone(),
            CommandKind::Compensate => def.compensation_retry.clone(),
        }
    }

    /// Nobody started the command: send it again under a new id (no attempt
    /// spent), unless the step has waited too long for a worker.
    fn redispatch_or_fail(
        &mut self,
        cur: Current,
        why: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let waited = cur.sent_at.and_then(|t| wall.duration_since(t).ok()).unwrap_or_default();
        let worker_wait = match self.limits.liveness {
            Liveness::Remote { worker_wait, .. } => worker_wait,
            // In-process handlers always take their command.
            _ => Duration::MAX,
        };
        if waited >= worker_wait {
            decided("no-worker");
            let (flow, step) = (
                &self.plan.def.name,
                self.rec.steps.get(cur.step as usize).map(|s| s.name.clone()).unwrap_or_default(),
            );
            let version = &self.plan.version;
            let error = format!(
                "no worker took the command in {} ms: is a worker serving step `{step}` of flow `{flow}` version {version} running?",
                waited.as_millis()
            );
            return self.attempt_failed(cur, error, false, false, now, wall, out);
        }
        let note = bounded(
            format!(
                "waiting for a worker of version {}: {why} (sent {} times)",
                self.plan.version,
                cur.redispatches + 2
            ),
            MAX_ERROR_LEN,
        );
        decided("redispatch");
        let command_id = self.entropy.command_id();
        self.push(Transition::Redispatched { step: cur.step, command_id, note }, out);
    }

    /// The attempt's outcome is unknown: it may have had its effect.
    fn unknown(
        &mut self,
        cur: Current,
        reason: String,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let error = format!("outcome unknown: {reason}");
        let retry = match cur.kind {
            // Compensations are idempotent by contract: always try again.
            CommandKind::Compensate => true,
            CommandKind::Execute => self
                .plan
                .def
                .steps
                .get(cur.step as usize)
                .is_some_and(|s| s.on_unknown == OnUnknown::Retry),
        };
        if retry {
            decided("unknown-retry");
            self.attempt_failed(cur, error, true, true, now, wall, out);
        } else {
            decided("unknown-maybe-done");
            self.step_failed(cur, error, true, now, wall, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_failed(
        &mut self,
        cur: Current,
        error: String,
        retryable: bool,
        unknown: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let error = bounded(error, MAX_ERROR_LEN);
        let step = cur.step as usize;
        let elapsed = self.since_first(step, cur.kind, now);
        if retryable {
            let policy = self.policy(step, cur.kind);
            let used = self.budget_used(cur.step, cur.kind, cur.attempt);
            let delay = policy.delay_for(used, &mut self.entropy.rng);
            if policy.allows_retry(used, elapsed, delay) {
                decided("failed-retry");
                let retry = RetryAt { at: wall + delay, delay };
                self.push(
                    Transition::RetryScheduled {
                        step: cur.step,
                        kind: cur.kind,
                        error,
                        retry,
                        unknown,
                    },
                    out,
                );
                return;
            }
            let on_exhausted = self.plan.def.steps.get(step).map(|s| match cur.kind {
                CommandKind::Execute => s.on_exhausted,
                CommandKind::Compensate => s.compensation_on_exhausted,
            });
            // An action that may have happened is not paused: it is compensated.
            let maybe_done = unknown && cur.kind == CommandKind::Execute;
            if on_exhausted == Some(OnExhausted::Pause) && !maybe_done {
                return self.pause(&cur, error, wall, out);
            }
        }
        self.step_failed(cur, error, unknown, now, wall, out);
    }

    /// The attempt's step (or compensation) fails for good.
    fn step_failed(
        &mut self,
        cur: Current,
        error: String,
        maybe_done: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut Decision,
    ) {
        let error = bounded(error, MAX_ERROR_LEN);
        let step = cur.step as usize;
        let duration = self.since_first(step, cur.kind, now);
        match cur.kind {
            CommandKind::Execute => {
                decided("failed-for-good");
                self.push(
                    Transition::StepFailed { step: cur.step, error, duration, maybe_done },
                    out,
                );
                // Its parallel siblings still going are stopped.
                self.stop_all(out);
                // From the failed step's whole stage: a step that may have
                // happened is compensated too (its status says so).
                let stage = self.plan.def.stage_of(step);
                self.next_compensation(stage.end, now, wall, out);
            }
            CommandKind::Compensate => {
                decided("compensation-failed");
                self.push(Transition::CompensationFailed { step: cur.step, error, duration }, out);
                // Keep undoing the earlier steps: each side effect that can be
                // undone is, and the report names the one that could not.
                self.compensation_over(step, now, wall, out);
            }
        }
    }

    fn finish(&mut self, now: Instant, out: &mut Decision) {
        // Cancelled before any step failed (a cancel during the rollback of a
        // failure changes nothing: that run failed).
        let cancelled = self.rec.extras().failed_step.is_none()
            && self.rec.extras().actions.iter().any(|a| a.action == ControlAction::Cancel);
        let status = if self.rec.steps.iter().any(|s| s.status == StepStatus::CompensationFailed) {
            RunStatus::CompensationFailed
        } else if cancelled {
            RunStatus::Cancelled
        } else if self.rec.extras().failed_step.is_none() && self.rec.extras().error.is_none() {
            RunStatus::Completed
        } else {
            RunStatus::Failed
        };
        decided("finished");
        let duration = now.saturating_duration_since(self.run_started);
        self.push(Transition::Finished { status, duration }, out);
    }

    /// The outputs a command for `step` of `kind` carries: those of the earlier
    /// completed steps, and for a compensation the step's own output too.
    pub(crate) fn outputs_for(&self, step: usize, kind: CommandKind) -> Vec<StepOutput> {
        // An action sees the stages before its own (its parallel siblings
        // run beside it); a compensation sees its own output too.
        let upto = match kind {
            CommandKind::Execute => self.plan.def.stage_of(step).start,
            CommandKind::Compensate => step + 1,
        };
        self.rec.steps[..upto.min(self.rec.steps.len())]
            .iter()
            .filter_map(|s| {
                s.output.as_ref().map(|o| StepOutput { step: s.name.clone(), output: o.clone() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use orchestrix_proto::{Payload, StepFailure};

    use super::*;
    use crate::StepDef;

    fn plan(compensable: &[bool], retries: u32) -> Arc<FlowPlan> {
        let mut def = FlowDef::new("f");
        for (i, c) in compensable.iter().enumerate() {
            let mut s = StepDef::new(&format!("s{i}"));
            s.compensable = *c;
            s.retry = RetryPolicy::new().retries(retries).retry_delay(Duration::from_millis(10));
            s.compensation_retry =
                RetryPolicy::new().retries(1).retry_delay(Duration::from_millis(10));
            def.steps.push(s);
        }
        Arc::new(FlowPlan::new(def, Vec::new()))
    }

    struct T {
        m: Machine,
        now: Instant,
        wall: SystemTime,
        /// Every event handed in, for replays.
        log: Vec<Event>,
    }

    impl T {
        fn new(compensable: &[bool], retries: u32) -> Self {
            Self::with(plan(compensable, retries), Uuid::now_v7(), 7)
        }
        fn with(plan: Arc<FlowPlan>, run_id: Uuid, seed: u64) -> Self {
            let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let rec = Arc::new(RunRecord::new(run_id, &plan.def, Payload::nil(), wall));
            let now = Instant::now();
            let m = Machine::new(plan, rec, Arc::default(), now, Entropy::seeded(seed));
            T { m, now, wall, log: Vec::new() }
        }
        fn ev(&mut self, e: Event) -> Vec<Transition> {
            self.decide(e).transitions
        }
        fn decide(&mut self, e: Event) -> Decision {
            self.log.push(e.clone());
            let mut out = Decision::default();
            self.m.handle(e, self.now, self.wall, &mut out);
            out
        }
        fn cur(&self) -> Uuid {
            self.m.rec.current.first().unwrap().command_id
        }
        fn ok(&mut self) -> Vec<Transition> {
            let id = self.cur();
            self.out(id, OutcomeResult::Completed { output: Payload::nil() })
        }
        fn fail(&mut self, retryable: bool) -> Vec<Transition> {
            let id = self.cur();
            let f = StepFailure::new("boom", retryable);
            self.out(id, OutcomeResult::Failed(f))
        }
        /// An answer for `id`, of the kind of the attempt in flight (as a
        /// worker answers).
        fn out(&mut self, id: Uuid, result: OutcomeResult) -> Vec<Transition> {
            let (attempt, kind) = self
                .m
                .rec
                .current
                .iter()
                .find(|c| c.command_id == id)
                .map_or((1, CommandKind::Execute), |c| (c.attempt, c.kind));
            self.ev(Event::Outcome { command_id: id, attempt, kind, result })
        }
        fn ack(&mut self) -> Vec<Transition> {
            let id = self.cur();
            self.ev(Event::Acked { command_id: id, worker: "w1".into() })
        }
        /// The worker goes silent, and nobody answers the inquiry that follows.
        fn silent(&mut self) -> Vec<Transition> {
            let id = self.cur();
            let asked = self.ev(Event::Silent { command_id: id });
            assert!(asked.is_empty(), "silence alone concludes nothing: {asked:?}");
            self.ev(Event::Unanswered { command_id: id })
        }
    }

    fn names(ts: &[Transition]) -> Vec<String> {
        ts.iter()
            .map(|t| match t {
                Transition::AttemptStarted { step, kind, attempt, .. } => {
                    format!("start {step} {} #{attempt}", kind.as_str())
                }
                Transition::RetryScheduled { step, .. } => format!("retry {step}"),
                Transition::StepCompleted { step, .. } => format!("completed {step}"),
                Transition::StepFailed { step, .. } => format!("failed {step}"),
                Transition::CompensationCompleted { step, .. } => format!("compensated {step}"),
                Transition::CompensationFailed { step, .. } => {
                    format!("compensation failed {step}")
                }
                Transition::Finished { status, .. } => format!("finished {status}"),
                Transition::AttemptAcked { .. } => "acked".into(),
                Transition::Redispatched { .. } => "redispatched".into(),
                Transition::LateOutcome(n) => format!("late {}", n.outcome),
                Transition::Cancelled { .. } => "cancelled".into(),
                Transition::Stopped { step, maybe_done } => {
                    format!("stopped {step} maybe_done={maybe_done}")
                }
                Transition::Paused(p) => format!("paused {}", p.step),
                Transition::Resumed { .. } => "resumed".into(),
                Transition::RolledBack { .. } => "rolled back".into(),
                Transition::Reopened { .. } => "reopened".into(),
                Transition::SlotAsked { slot, .. } => format!("asked {slot}"),
                Transition::SlotTaken { slot } => format!("taken {slot}"),
                Transition::Expired { .. } => "expired".into(),
            })
            .collect()
    }

    fn cancel(by: &str) -> Event {
        Event::Control(OperatorAction {
            action: ControlAction::Cancel,
            by: by.into(),
            reason: Some("customer asked".into()),
            at: SystemTime::UNIX_EPOCH,
        })
    }

    #[test]
    fn a_cancel_stops_the_attempt_in_hand_and_compensates_it_as_maybe_done() {
        let mut t = T::new(&[true, true, false], 0);
        Arc::make_mut(&mut t.m.limits).liveness = remote();
        t.ev(Event::Start);
        t.ok();
        t.ack();
        let stopped = t.cur();
        let d = t.decide(cancel("ops"));
        assert_eq!(
            names(&d.transitions),
            ["cancelled", "stopped 1 maybe_done=true", "start 1 compensate #1"],
            "the started step may have happened: compensated first"
        );
        let Some(Effect::Cancel(cmd)) = d.effects.iter().find(|e| matches!(e, Effect::Cancel(_)))
        else {
            panic!("no cancel effect: {:?}", kinds(&d.effects))
        };
        assert_eq!(cmd.command_id, stopped);
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Compensating);
        assert_eq!(names(&t.ok()), ["compensated 1", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished cancelled"]);
        let report = t.m.rec.to_report(Duration::ZERO);
        assert_eq!(report.actions.len(), 1);
        assert_eq!(report.actions[0].by, "ops");
        assert_eq!(report.error.as_deref(), Some("cancelled by ops: customer asked"));
        assert_eq!(report.failed_step, None);
    }

    #[test]
    fn a_cancel_during_a_retry_delay_compensates_only_what_completed() {
        let mut t = T::new(&[true, true], 2);
        t.ev(Event::Start);
        t.ok();
        t.fail(true);
        let due = t.cur();
        let d = t.decide(cancel("ops"));
        assert_eq!(
            names(&d.transitions),
            ["cancelled", "stopped 1 maybe_done=false", "start 0 compensate #1"]
        );
        assert!(!kinds(&d.effects).contains(&"cancel"), "nothing in hand to stop");
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Cancelled);
        // The retry timer of the cancelled attempt fires: nothing happens.
        assert!(t.ev(Event::RetryDue { command_id: due }).is_empty());
        assert_eq!(names(&t.ok()), ["compensated 0", "finished cancelled"]);
    }

    #[test]
    fn a_cancel_during_a_rollback_is_recorded_and_changes_nothing() {
        let mut t = T::new(&[true, false], 0);
        t.ev(Event::Start);
        t.ok();
        t.fail(false);
        assert_eq!(t.m.rec.phase, Phase::Compensating);
        assert_eq!(names(&t.ev(cancel("ops"))), ["cancelled"]);
        // Twice: harmless, nothing recorded again.
        assert!(t.ev(cancel("ops")).is_empty());
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);
        assert_eq!(t.m.rec.extras().actions.len(), 1);
    }

    #[test]
    fn a_cancel_racing_the_last_outcome() {
        // The cancel wins: the answer that follows is late, never applied.
        let mut t = T::new(&[false, true], 0);
        t.ev(Event::Start);
        t.ok();
        let last = t.cur();
        // The step was sent: it may have run, so it is compensated.
        assert_eq!(
            names(&t.ev(cancel("ops"))),
            ["cancelled", "stopped 1 maybe_done=true", "start 1 compensate #1"]
        );
        let late = t.out(last, OutcomeResult::Completed { output: Payload::nil() });
        assert!(matches!(late.as_slice(), [Transition::LateOutcome(_)]), "noted, not applied");
        assert_eq!(names(&t.ok()), ["compensated 1", "finished cancelled"]);
        // The run ended first: a cancel is refused, with the status.
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        t.ok();
        let Event::Control(action) = cancel("ops") else { unreachable!() };
        let why = t.m.refusal(&action).unwrap();
        assert!(why.ends_with("already finished: completed"), "{why}");
    }

    fn op(action: ControlAction) -> Event {
        Event::Control(OperatorAction {
            action,
            by: "ops".into(),
            reason: None,
            at: SystemTime::UNIX_EPOCH,
        })
    }

    /// `[true, true]`, one retry each; step 1 pauses when its retries run out.
    fn pausing(timeout: Option<Duration>) -> T {
        let mut t = T::new(&[true, true], 1);
        let mut plan = (*t.m.plan).clone();
        plan.def.steps[1].on_exhausted = OnExhausted::Pause;
        plan.def.steps[1].pause_timeout = timeout;
        t.m.plan = Arc::new(FlowPlan::new(plan.def, Vec::new()));
        t.ev(Event::Start);
        t.ok();
        t
    }

    #[test]
    fn a_step_out_of_retries_pauses_and_resumes_with_a_fresh_budget() {
        let mut t = pausing(None);
        assert_eq!(names(&t.fail(true)), ["retry 1"]);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        let d = t.decide(Event::Outcome {
            command_id: t.cur(),
            attempt: 2,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("db down", true)),
        });
        assert_eq!(d.transitions.len(), 1);
        assert!(
            matches!(&d.transitions[0], Transition::Paused(p) if p.step == 1 && p.error == "db down")
        );
        assert_eq!(t.m.rec.status, RunStatus::Paused);
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Paused);
        assert_eq!(t.m.rec.steps[1].attempts, 2);
        assert!(t.m.rec.current.is_empty());
        // Resume and rollback are refused unless paused; cancel is not.
        let Event::Control(resume) = op(ControlAction::Resume) else { unreachable!() };
        assert!(t.m.refusal(&resume).is_none());
        assert_eq!(names(&t.ev(op(ControlAction::Resume))), ["resumed", "start 1 execute #3"]);
        assert_eq!(t.m.rec.status, RunStatus::Running);
        assert!(t.m.refusal(&resume).unwrap().contains("is not paused"));
        // A fresh budget: one retry again, then paused again.
        assert_eq!(names(&t.fail(true)), ["retry 1"]);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        assert!(matches!(t.fail(true).as_slice(), [Transition::Paused(_)]));
        // Resumed, it completes this time.
        t.ev(op(ControlAction::Resume));
        assert_eq!(names(&t.ok()), ["completed 1", "finished completed"]);
        assert_eq!(t.m.rec.extras().actions.len(), 2);
    }

    #[test]
    fn a_paused_run_rolls_back_when_told_or_when_its_pause_times_out() {
        let mut t = pausing(None);
        t.fail(true);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        t.fail(true);
        assert_eq!(
            names(&t.ev(op(ControlAction::Rollback))),
            ["rolled back", "failed 1", "start 0 compensate #1"],
            "the rolled-back step failed for good; only what completed is compensated"
        );
        assert!(t.m.rec.extras().error.as_deref().unwrap().ends_with("(rolled back by ops)"));
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);

        let mut t = pausing(Some(Duration::from_secs(60)));
        t.fail(true);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        let d = t.decide(Event::Outcome {
            command_id: t.cur(),
            attempt: 2,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("db down", true)),
        });
        assert!(kinds(&d.effects).contains(&"pause-deadline"));
        // Early: nothing. Due: rolled back by the timeout.
        assert!(t.ev(Event::PauseExpired).is_empty());
        t.wall += Duration::from_secs(61);
        assert_eq!(
            names(&t.ev(Event::PauseExpired)),
            ["rolled back", "failed 1", "start 0 compensate #1"]
        );
        assert_eq!(t.m.rec.extras().actions[0].by, "pause timeout");
    }

    #[test]
    fn a_paused_run_can_be_cancelled_and_a_takeover_keeps_it_paused() {
        let mut t = pausing(Some(Duration::from_secs(60)));
        t.fail(true);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        t.fail(true);
        // Taken over while paused: still paused, its timeout armed again.
        let d = t.decide(Event::Resume);
        assert!(d.transitions.is_empty());
        assert!(kinds(&d.effects).contains(&"pause-deadline"));
        assert_eq!(t.m.rec.status, RunStatus::Paused);
        assert_eq!(
            names(&t.ev(cancel("ops"))),
            ["cancelled", "stopped 1 maybe_done=false", "start 0 compensate #1"]
        );
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Cancelled);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished cancelled"]);
    }

    #[test]
    fn a_failed_rollback_resumes_at_the_compensation_that_failed_only() {
        // s0, s1 complete; s2 fails; s1's compensation fails for good (one
        // retry); s0's succeeds: compensation_failed.
        let mut t = T::new(&[true, true, false], 0);
        t.ev(Event::Start);
        t.ok();
        t.ok();
        t.fail(false);
        t.fail(true);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        t.fail(true);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished compensation_failed"]);
        let Event::Control(resume) = op(ControlAction::Resume) else { unreachable!() };
        assert!(t.m.refusal(&resume).is_none(), "a failed rollback can be resumed");
        let d = t.decide(Event::Reopen(resume));
        assert_eq!(names(&d.transitions), ["reopened", "start 1 compensate #3"]);
        // A fresh budget: one retry again.
        assert_eq!(names(&t.fail(true)), ["retry 1"]);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        // s0's compensation succeeded before: never run again.
        assert_eq!(names(&t.ok()), ["compensated 1", "finished failed"]);
        assert_eq!(t.m.rec.steps[0].compensation.as_ref().unwrap().attempts, 1);
    }

    #[test]
    fn a_rollback_paused_at_a_compensation_refuses_a_cancel() {
        let mut t = T::new(&[true, false], 0);
        let mut plan = (*t.m.plan).clone();
        plan.def.steps[0].compensation_on_exhausted = OnExhausted::Pause;
        plan.def.steps[0].compensation_retry = RetryPolicy::new();
        t.m.plan = Arc::new(FlowPlan::new(plan.def, Vec::new()));
        t.ev(Event::Start);
        t.ok();
        t.fail(false);
        assert!(
            matches!(t.fail(true).as_slice(), [Transition::Paused(p)] if p.kind == CommandKind::Compensate)
        );
        let Event::Control(c) = cancel("ops") else { unreachable!() };
        let why = t.m.refusal(&c).unwrap();
        assert!(why.contains("paused at the compensation of `s0`"), "{why}");
        // Resumed, the compensation succeeds and the run ends failed.
        t.ev(op(ControlAction::Resume));
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);
    }

    /// A plan whose steps `groups[i]` (when `Some`) are in parallel group
    /// of that name; every step compensable, no retries.
    fn grouped(groups: &[Option<&str>]) -> Arc<FlowPlan> {
        let mut def = plan(&vec![true; groups.len()], 0).def.clone();
        for (s, g) in def.steps.iter_mut().zip(groups) {
            s.group = g.map(Arc::from);
        }
        def.validate().unwrap();
        Arc::new(FlowPlan::new(def, Vec::new()))
    }

    impl T {
        /// The command in flight for `step`.
        fn id_of(&self, step: u32) -> Uuid {
            self.m.rec.current.iter().find(|c| c.step == step).unwrap().command_id
        }
        fn ok_at(&mut self, step: u32) -> Vec<Transition> {
            let id = self.id_of(step);
            self.out(id, OutcomeResult::Completed { output: Payload::nil() })
        }
        fn fail_at(&mut self, step: u32) -> Vec<Transition> {
            let id = self.id_of(step);
            self.out(id, OutcomeResult::Failed(StepFailure::new("boom", false)))
        }
    }

    #[test]
    fn a_group_starts_together_and_the_flow_goes_on_when_all_completed() {
        let mut t = T::with(grouped(&[None, Some("g"), Some("g"), None]), Uuid::now_v7(), 1);
        assert_eq!(names(&t.ev(Event::Start)), ["start 0 execute #1"]);
        assert_eq!(names(&t.ok()), ["completed 0", "start 1 execute #1", "start 2 execute #1"]);
        // The second member first: the group is not done yet.
        assert_eq!(names(&t.ok_at(2)), ["completed 2"]);
        assert_eq!(names(&t.ok_at(1)), ["completed 1", "start 3 execute #1"]);
        // The step after the group sees both members' outputs.
        let cmd = t.m.command(3, CommandKind::Execute, 1, t.id_of(3));
        let seen: Vec<&str> = cmd.outputs.iter().map(|o| &*o.step).collect();
        assert_eq!(seen, ["s0", "s1", "s2"]);
        // A member sees what came before its group, never a sibling's output.
        let cmd = t.m.command(2, CommandKind::Execute, 2, Uuid::nil());
        assert_eq!(cmd.outputs.iter().map(|o| &*o.step).collect::<Vec<_>>(), ["s0"]);
        assert_eq!(names(&t.ok()), ["completed 3", "finished completed"]);
    }

    #[test]
    fn a_member_failing_stops_its_siblings_and_the_group_is_compensated_together() {
        let mut t = T::with(grouped(&[None, Some("g"), Some("g"), Some("g")]), Uuid::now_v7(), 1);
        t.ev(Event::Start);
        t.ok();
        // s1 completes, s3 is in flight; s2 fails for good.
        t.ok_at(1);
        let sibling = t.id_of(3);
        let d = t.decide(Event::Outcome {
            command_id: t.id_of(2),
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("boom", false)),
        });
        assert_eq!(
            names(&d.transitions),
            [
                "failed 2",
                "stopped 3 maybe_done=true",
                "start 1 compensate #1",
                "start 3 compensate #1"
            ]
        );
        // Its workers are told to stop the sibling's attempt.
        assert!(
            d.effects.iter().any(|e| matches!(e, Effect::Cancel(c) if c.command_id == sibling))
        );
        assert_eq!(t.m.rec.steps[3].status, StepStatus::Compensating);
        // A late answer of the stopped attempt changes nothing.
        assert_eq!(
            names(&t.out(sibling, OutcomeResult::Completed { output: Payload::nil() })),
            ["late completed"]
        );
        // The group's compensations end in any order; then the step before it.
        assert_eq!(names(&t.ok_at(3)), ["compensated 3"]);
        assert_eq!(names(&t.ok_at(1)), ["compensated 1", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok_at(0)), ["compensated 0", "finished failed"]);
    }

    #[test]
    fn rollback_is_reverse_between_groups_and_parallel_inside_one() {
        // (s0 s1) (s2 s3) s4 (s5 s6) s7, and s7 fails.
        let groups = [Some("a"), Some("a"), Some("b"), Some("b"), None, Some("c"), Some("c"), None];
        let mut t = T::with(grouped(&groups), Uuid::now_v7(), 1);
        t.ev(Event::Start);
        for stage in [&[0, 1][..], &[2, 3], &[4], &[5, 6]] {
            for &i in stage.iter().rev() {
                t.ok_at(i);
            }
        }
        let mut log = t.fail_at(7);
        // Answer the compensations in flight, last started first, until done.
        while let Some(c) = t.m.rec.current.last().cloned() {
            log.extend(t.ok_at(c.step));
        }
        let started: Vec<u32> = log
            .iter()
            .filter_map(|x| match x {
                Transition::AttemptStarted { step, kind: CommandKind::Compensate, .. } => {
                    Some(*step)
                }
                _ => None,
            })
            .collect();
        let ended = |step: u32| {
            log.iter().position(|x| matches!(x, Transition::CompensationCompleted { step: s, .. } if *s == step)).unwrap()
        };
        let began = |step: u32| {
            log.iter().position(|x| matches!(x, Transition::AttemptStarted { step: s, kind: CommandKind::Compensate, .. } if *s == step)).unwrap()
        };
        assert_eq!(started.len(), 7, "every completed step is compensated once: {started:?}");
        // Reverse between stages: every compensation of a later stage ends
        // before any of an earlier stage begins.
        let stages: [&[u32]; 4] = [&[5, 6], &[4], &[2, 3], &[0, 1]];
        for pair in stages.windows(2) {
            for &later in pair[0] {
                for &earlier in pair[1] {
                    assert!(ended(later) < began(earlier), "{later} before {earlier}: {log:?}");
                }
            }
        }
        // Parallel inside one: both members begin before either ends.
        for g in [[5, 6], [2, 3], [0, 1]] {
            assert!(began(g[0]).max(began(g[1])) < ended(g[0]).min(ended(g[1])), "{g:?}");
        }
        assert_eq!(t.m.rec.status, RunStatus::Failed);
    }

    #[test]
    fn a_cancel_stops_every_member_in_flight() {
        let mut t = T::with(grouped(&[Some("g"), Some("g"), Some("g")]), Uuid::now_v7(), 1);
        t.ev(Event::Start);
        t.ok_at(0);
        let d = t.decide(cancel("ops"));
        assert_eq!(
            names(&d.transitions),
            [
                "cancelled",
                "stopped 1 maybe_done=true",
                "stopped 2 maybe_done=true",
                "start 0 compensate #1",
                "start 1 compensate #1",
                "start 2 compensate #1"
            ]
        );
        assert_eq!(d.effects.iter().filter(|e| matches!(e, Effect::Cancel(_))).count(), 2);
    }

    #[test]
    fn a_takeover_resumes_every_member_in_flight() {
        let mut t = T::with(grouped(&[Some("g"), Some("g")]), Uuid::now_v7(), 1);
        Arc::make_mut(&mut t.m.limits).liveness = remote();
        t.ev(Event::Start);
        let rec = t.m.rec.clone();
        let mut back = Machine::resumed(
            t.m.plan.clone(),
            rec,
            Arc::default(),
            t.now,
            t.wall,
            Entropy::seeded(2),
        );
        Arc::make_mut(&mut back.limits).liveness = remote();
        let mut d = Decision::default();
        back.handle(Event::Resume, t.now, t.wall, &mut d);
        // Neither was acked: each is asked about once its start-by time has
        // passed (an inquiry crossing a command still on its way finds
        // nobody holding it), never sent again at once.
        assert_eq!(kinds(&d.effects).iter().filter(|k| **k == "watch").count(), 2);
        let ids: Vec<Uuid> = back.rec.current.iter().map(|c| c.command_id).collect();
        for id in ids {
            let mut d = Decision::default();
            back.handle(Event::NotTaken { command_id: id }, t.now, t.wall, &mut d);
            assert_eq!(kinds(&d.effects), ["inquire", "watch-inquiry"]);
        }
    }

    #[test]
    fn a_group_must_be_one_block_and_cannot_pause() {
        let mut def = plan(&[true, true, true], 0).def.clone();
        def.steps[0].group = Some("g".into());
        def.steps[2].group = Some("g".into());
        assert!(def.validate().unwrap_err().to_string().contains("next to each other"));
        def.steps[1].group = Some("g".into());
        def.validate().unwrap();
        assert_eq!(def.stages(), vec![std::ops::Range { start: 0, end: 3 }]);
        def.steps[1].on_exhausted = OnExhausted::Pause;
        assert!(def.validate().unwrap_err().to_string().contains("cannot pause"));
    }

    #[test]
    fn start_sends_the_first_step() {
        let mut t = T::new(&[false, false], 0);
        assert_eq!(names(&t.ev(Event::Start)), ["start 0 execute #1"]);
        // A second Start (a restarted actor) does not start it again.
        assert!(t.ev(Event::Start).is_empty());
    }

    #[test]
    fn completion_moves_on_then_finishes() {
        let mut t = T::new(&[false, false], 0);
        t.ev(Event::Start);
        assert_eq!(names(&t.ok()), ["completed 0", "start 1 execute #1"]);
        assert_eq!(names(&t.ok()), ["completed 1", "finished completed"]);
        assert!(t.m.is_finished());
    }

    #[test]
    fn an_empty_flow_completes_at_once() {
        let mut t = T::new(&[], 0);
        assert_eq!(names(&t.ev(Event::Start)), ["finished completed"]);
    }

    #[test]
    fn retryable_failure_schedules_a_retry_until_the_policy_is_spent() {
        let mut t = T::new(&[true, false], 1);
        t.ev(Event::Start);
        t.ok();
        assert_eq!(names(&t.fail(true)), ["retry 1"]);
        // While waiting, the failed attempt's late answer is noted, not applied.
        assert_eq!(names(&t.ok()), ["late completed"]);
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Running);
        let id = t.cur();
        assert_eq!(names(&t.ev(Event::RetryDue { command_id: id })), ["start 1 execute #2"]);
        assert_eq!(names(&t.fail(true)), ["failed 1", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);
    }

    #[test]
    fn permanent_failure_skips_retries() {
        let mut t = T::new(&[false], 5);
        t.ev(Event::Start);
        assert_eq!(names(&t.fail(false)), ["failed 0", "finished failed"]);
        assert_eq!(t.m.rec.steps[0].attempts, 1);
    }

    #[test]
    fn stale_and_unknown_answers_change_nothing() {
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let stale = Uuid::new_v4();
        let ok = OutcomeResult::Completed { output: Payload::nil() };
        assert_eq!(names(&t.out(stale, ok.clone())), ["late completed"]);
        // Noted once, never applied.
        assert!(t.out(stale, ok).is_empty());
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Running);
        assert!(t.ev(Event::RetryDue { command_id: stale }).is_empty());
        assert!(t.ev(Event::Silent { command_id: stale }).is_empty());
        assert!(t.ev(Event::NotTaken { command_id: stale }).is_empty());
        // A retry timer for the attempt in flight (not waiting) is ignored too.
        let id = t.cur();
        assert!(t.ev(Event::RetryDue { command_id: id }).is_empty());
    }

    #[test]
    fn a_command_nobody_took_is_sent_again_without_spending_an_attempt() {
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let first = t.cur();
        // No ack proves nothing (it may be held up, or lost): every replica
        // is asked first, and the command is sent again only if none holds it.
        let mut d = Decision::default();
        t.m.handle(Event::NotTaken { command_id: first }, t.now, t.wall, &mut d);
        assert!(d.transitions.is_empty());
        assert_eq!(kinds(&d.effects), ["inquire"]);
        assert_eq!(names(&t.ev(Event::Unanswered { command_id: first })), ["redispatched"]);
        assert_ne!(t.cur(), first, "a new command id");
        assert_eq!(t.m.rec.steps[0].attempts, 1);
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Waiting);
        assert_eq!(t.m.rec.steps[0].extras().error, None, "waiting is not an error");
        // An expired command (arrived after its start-by time) is the same.
        let expired = |id| Event::Rejected {
            command_id: id,
            code: WireError::CODE_EXPIRED.into(),
            message: "late".into(),
        };
        let second = t.cur();
        assert_eq!(names(&t.ev(expired(second))), ["redispatched"]);
        // Past the wait for a worker, the step fails (nothing ran: not maybe done).
        Arc::make_mut(&mut t.m.limits).liveness = remote_waiting(Duration::ZERO);
        let id = t.cur();
        assert!(t.ev(Event::NotTaken { command_id: id }).is_empty());
        assert_eq!(
            names(&t.ev(Event::Unanswered { command_id: id })),
            ["failed 0", "finished failed"]
        );
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Failed);

        // The ack was only late: it answers the inquiry, and the command
        // is not sent again.
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let late = t.cur();
        t.ev(Event::NotTaken { command_id: late });
        assert_eq!(names(&t.ack()), ["acked"]);
        assert_eq!(t.cur(), late);
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Running);

        // A worker takes a redispatched command: running again, and an acked
        // attempt is never sent again.
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let id = t.cur();
        t.ev(Event::NotTaken { command_id: id });
        t.ev(Event::Unanswered { command_id: id });
        assert_eq!(names(&t.ack()), ["acked"]);
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Running);
        let id = t.cur();
        assert!(t.ev(expired(id)).is_empty());
        assert!(t.ev(Event::NotTaken { command_id: id }).is_empty());
    }

    #[test]
    fn an_acked_attempt_that_goes_silent_is_unknown_and_maybe_done_by_default() {
        let mut t = T::new(&[true, true], 3);
        t.ev(Event::Start);
        t.ok();
        assert_eq!(names(&t.ack()), ["acked"]);
        assert!(t.ack().is_empty(), "a second ack changes nothing");
        // Not retried (could charge twice); rolled back, its own compensation included.
        assert_eq!(names(&t.silent()), ["failed 1", "start 1 compensate #1"]);
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Compensating);
        assert!(t.m.rec.steps[1].extras().error.as_deref().unwrap().starts_with("outcome unknown"));
        assert_eq!(names(&t.ok()), ["compensated 1", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);
    }

    #[test]
    fn a_silent_worker_is_asked_first_and_its_late_answer_still_counts() {
        let mut t = T::new(&[true], 0);
        Arc::make_mut(&mut t.m.limits).liveness = remote();
        t.ev(Event::Start);
        t.ack();
        let id = t.cur();
        // Silence concludes nothing yet: every replica is asked.
        let d = t.decide(Event::Silent { command_id: id });
        assert!(d.transitions.is_empty());
        assert_eq!(kinds(&d.effects), ["inquire", "watch-inquiry"]);
        // The worker had lost its outcome with its connection; asked, it
        // answers from its cache, and the step completes on its one attempt.
        assert_eq!(names(&t.ok()), ["completed 0", "finished completed"]);
        assert_eq!(t.m.rec.steps[0].attempts, 1);
        // Asked again and still running: its ack says it is alive.
        let mut t = T::new(&[true], 0);
        Arc::make_mut(&mut t.m.limits).liveness = remote();
        t.ev(Event::Start);
        t.ack();
        let id = t.cur();
        t.ev(Event::Silent { command_id: id });
        assert_eq!(
            kinds(&t.decide(Event::Acked { command_id: id, worker: "w1".into() }).effects),
            ["alive"]
        );
        // Nobody answering makes it unknown, and says both why and what was tried.
        t.ev(Event::Silent { command_id: id });
        assert_eq!(
            names(&t.ev(Event::Unanswered { command_id: id })),
            ["failed 0", "start 0 compensate #1"]
        );
        let error = t.m.rec.steps[0].extras().error.clone().unwrap();
        assert!(
            error.ends_with(
                "worker w1 went silent: no heartbeat for 5s, and no worker answered when asked"
            ),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_outcome_of_an_idempotent_step_is_retried() {
        let mut t = T::new(&[false], 1);
        let mut def = t.m.plan.def.clone();
        def.steps[0].on_unknown = OnUnknown::Retry;
        t.m.plan = Arc::new(FlowPlan::new(def, Vec::new()));
        t.ev(Event::Start);
        t.ack();
        assert_eq!(names(&t.silent()), ["retry 0"]);
        assert!(t.m.rec.steps[0].maybe_done);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        // The retry fails for good: the step may still have happened earlier.
        assert_eq!(names(&t.fail(false)), ["failed 0", "finished failed"]);
        assert_eq!(t.m.rec.steps[0].status, StepStatus::Unknown);
    }

    #[test]
    fn a_maybe_done_failure_from_the_worker_counts_as_unknown() {
        let mut t = T::new(&[true], 3);
        t.ev(Event::Start);
        t.ack();
        let id = t.cur();
        let f = StepFailure::maybe_done("step timed out after 1s");
        assert_eq!(
            names(&t.out(id, OutcomeResult::Failed(f))),
            ["failed 0", "start 0 compensate #1"]
        );
    }

    #[test]
    fn a_timeout_before_any_ack_is_a_plain_failure() {
        let mut t = T::new(&[true], 1);
        t.ev(Event::Start);
        let id = t.cur();
        let ev = Event::TimedOut { command_id: id, reason: "no outcome".into() };
        assert_eq!(names(&t.ev(ev)), ["retry 0"]);
        assert!(!t.m.rec.steps[0].maybe_done);
    }

    #[test]
    fn after_a_takeover_an_unanswered_inquiry_depends_on_the_ack() {
        // Never acked: nobody started it, send it again.
        let mut t = T::new(&[true], 0);
        t.ev(Event::Start);
        let id = t.cur();
        assert_eq!(names(&t.ev(Event::Unanswered { command_id: id })), ["redispatched"]);
        // Acked by a worker that is gone: unknown.
        t.ack();
        let id = t.cur();
        assert_eq!(
            names(&t.ev(Event::Unanswered { command_id: id })),
            ["failed 0", "start 0 compensate #1"]
        );
    }

    #[test]
    fn poison_and_oversized_outputs_fail_the_step_as_maybe_done() {
        let mut t = T::new(&[true, true], 0);
        t.ev(Event::Start);
        t.ok();
        let id = t.cur();
        let bad = OutcomeResult::Completed { output: Payload::from_msgpack(vec![0xc1]) };
        assert_eq!(names(&t.out(id, bad)), ["failed 1", "start 1 compensate #1"]);
        assert!(
            t.m.rec.steps[1].extras().error.as_deref().unwrap().contains("not valid MessagePack")
        );

        let mut t = T::new(&[true], 0);
        Arc::make_mut(&mut t.m.limits).max_payload_bytes = 100;
        t.ev(Event::Start);
        let id = t.cur();
        let big = Payload::encode(&vec![7u8; 200]).unwrap();
        let out = t.out(id, OutcomeResult::Completed { output: big });
        assert_eq!(names(&out), ["failed 0", "start 0 compensate #1"]);
        assert!(
            t.m.rec.steps[0]
                .extras()
                .error
                .as_deref()
                .unwrap()
                .contains("over the limit of 100 bytes")
        );
    }

    /// Drives a run through every decision the machine can take, reacting to
    /// its command ids as a worker would. Returns its transitions.
    fn every_decision(t: &mut T, other: &mut T) -> Vec<Transition> {
        let mut all = Vec::new();
        let mut go = |t: &mut T, e: Event| {
            let out = t.ev(e);
            all.extend(out.iter().cloned());
            out
        };
        // t: four steps, all compensable, one retry each (see `plan`).
        go(t, Event::Start); // start
        let id = t.cur();
        go(t, Event::NotTaken { command_id: id }); // not-taken: asked first
        go(t, Event::Unanswered { command_id: id }); // unanswered-never-acked, redispatch
        let id = t.cur();
        let expired = Event::Rejected {
            command_id: id,
            code: WireError::CODE_EXPIRED.into(),
            message: "late".into(),
        };
        go(t, expired); // rejected-expired
        let id = t.cur();
        go(t, Event::Unanswered { command_id: id }); // unanswered-never-acked
        let id = t.cur();
        go(t, Event::Acked { command_id: id, worker: "w".into() }); // acked
        let ok = |id| Event::Outcome {
            command_id: id,
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Completed { output: Payload::nil() },
        };
        go(t, ok(id)); // completed
        go(t, ok(id)); // late (the same answer again)
        let id = t.cur();
        let failed = |id, retryable| Event::Outcome {
            command_id: id,
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("boom", retryable)),
        };
        go(t, failed(id, true)); // failed-retry
        go(t, Event::RetryDue { command_id: id }); // retry-due
        let id = t.cur();
        go(t, Event::DispatchFailed { command_id: id, retryable: true, message: "down".into() }); // dispatch-failed
        go(t, Event::RetryDue { command_id: id });
        let id = t.cur();
        go(t, Event::TimedOut { command_id: id, reason: "no outcome".into() }); // timed-out-not-started
        go(t, Event::RetryDue { command_id: id });
        let id = t.cur();
        let refused =
            Event::Rejected { command_id: id, code: "no_handler".into(), message: "none".into() };
        go(t, refused); // rejected-refused, failed-for-good: rollback
        let id = t.cur();
        let comp_failed = Event::Outcome {
            command_id: id,
            attempt: 1,
            kind: CommandKind::Compensate,
            result: OutcomeResult::Failed(StepFailure::new("stuck", false)),
        };
        go(t, comp_failed); // compensation-failed, finished

        // other: unknown outcomes, output refused, the deadline, no worker.
        let mut def = other.m.plan.def.clone();
        def.steps[1].on_unknown = OnUnknown::Retry;
        other.m.plan = Arc::new(FlowPlan::new(def, Vec::new()));
        Arc::make_mut(&mut other.m.rec).extras_mut().timeout = Some(Duration::from_secs(1));
        go(other, Event::Start);
        let id = other.cur();
        go(other, Event::Acked { command_id: id, worker: "w".into() });
        go(other, ok(id));
        let id = other.cur();
        go(other, Event::Acked { command_id: id, worker: "w".into() });
        go(other, Event::Silent { command_id: id }); // silent: ask
        go(other, Event::Unanswered { command_id: id }); // unanswered-acked, unknown-retry
        go(other, Event::RetryDue { command_id: id });
        let id = other.cur();
        go(other, Event::Acked { command_id: id, worker: "w".into() });
        go(other, Event::TimedOut { command_id: id, reason: "late".into() }); // timed-out-acked
        go(other, Event::RetryDue { command_id: id });
        let id = other.cur();
        let bad = Event::Outcome {
            command_id: id,
            attempt: 2,
            kind: CommandKind::Execute,
            result: OutcomeResult::Completed { output: Payload::from_msgpack(vec![0xc1]) },
        };
        go(other, bad); // output-refused: step 1 maybe done, compensated
        let id = other.cur();
        let done = Event::Outcome {
            command_id: id,
            attempt: 1,
            kind: CommandKind::Compensate,
            result: OutcomeResult::Completed { output: Payload::nil() },
        };
        go(other, done); // compensated
        let id = other.cur();
        go(other, Event::Acked { command_id: id, worker: "w".into() });
        go(other, Event::Unanswered { command_id: id }); // unanswered-acked (compensation: retried)
        let _ = go(other, Event::DeadlineExceeded); // compensating: ignored

        let mut third = T::with(plan(&[true], 0), Uuid::from_u128(3), 9);
        go(&mut third, Event::Start);
        let id = third.cur();
        go(&mut third, Event::Acked { command_id: id, worker: "w".into() });
        go(&mut third, Event::Silent { command_id: id });
        go(&mut third, Event::Unanswered { command_id: id }); // unknown-maybe-done
        let mut fourth = T::with(plan(&[false], 0), Uuid::from_u128(4), 9);
        Arc::make_mut(&mut fourth.m.rec).extras_mut().timeout = Some(Duration::from_secs(1));
        go(&mut fourth, Event::Start);
        go(&mut fourth, Event::DeadlineExceeded); // deadline
        let mut fifth = T::with(plan(&[false], 0), Uuid::from_u128(5), 9);
        Arc::make_mut(&mut fifth.m.limits).liveness = remote_waiting(Duration::ZERO);
        go(&mut fifth, Event::Start);
        let id = fifth.cur();
        go(&mut fifth, Event::NotTaken { command_id: id });
        go(&mut fifth, Event::Unanswered { command_id: id }); // no-worker
        let mut sixth = T::with(plan(&[false], 0), Uuid::from_u128(6), 9);
        go(&mut sixth, Event::Start);
        go(&mut sixth, Event::Resume); // resume
        let mut seventh = T::with(plan(&[true, false], 0), Uuid::from_u128(7), 9);
        go(&mut seventh, Event::Start);
        seventh.ok();
        go(&mut seventh, cancel("ops")); // cancel
        go(&mut seventh, cancel("ops")); // cancel-again
        let mut eighth = T::with(plan(&[true, false], 0), Uuid::from_u128(8), 9);
        go(&mut eighth, Event::Start);
        eighth.ok();
        eighth.fail(false);
        go(&mut eighth, cancel("ops")); // cancel-during-rollback
        let mut ninth = pausing(Some(Duration::from_secs(1)));
        ninth.fail(true);
        let id = ninth.cur();
        ninth.ev(Event::RetryDue { command_id: id });
        ninth.fail(true); // pause
        go(&mut ninth, op(ControlAction::Resume)); // resume-paused
        ninth.fail(true);
        let id = ninth.cur();
        ninth.ev(Event::RetryDue { command_id: id });
        ninth.fail(true);
        go(&mut ninth, op(ControlAction::Rollback)); // rollback-paused
        let mut tenth = pausing(Some(Duration::from_secs(1)));
        tenth.fail(true);
        let id = tenth.cur();
        tenth.ev(Event::RetryDue { command_id: id });
        tenth.fail(true);
        tenth.wall += Duration::from_secs(2);
        go(&mut tenth, Event::PauseExpired); // pause-expired
        let mut eleventh = T::with(plan(&[true, true, false], 0), Uuid::from_u128(11), 9);
        eleventh.ev(Event::Start);
        eleventh.ok();
        eleventh.ok();
        eleventh.fail(false);
        eleventh.fail(false); // compensation of s1 failed for good
        eleventh.ok(); // s0 compensated
        go(
            &mut eleventh,
            Event::Reopen(OperatorAction {
                action: ControlAction::Resume,
                by: "ops".into(),
                reason: None,
                at: SystemTime::UNIX_EPOCH,
            }),
        ); // reopen-rollback
        // Slots: a keyed run queues, waits, gets its turn; a limited step
        // waits for its slot; a queued run's deadline passes.
        let mut twelfth = keyed(&[None, Some(2)], "k");
        go(&mut twelfth, Event::Start); // queue
        let key = twelfth.m.key_slot().unwrap().0;
        go(&mut twelfth, Event::Slot { slot: key.clone(), granted: false }); // slot-wait
        go(&mut twelfth, Event::Slot { slot: key, granted: true }); // slot-granted
        twelfth.ok(); // slot-ask (s1 has a limit)
        let mut thirteenth = keyed(&[None], "k");
        Arc::make_mut(&mut thirteenth.m.rec).extras_mut().timeout = Some(Duration::from_secs(1));
        thirteenth.ev(Event::Start);
        go(&mut thirteenth, Event::DeadlineExceeded); // deadline-waiting
        all
    }

    /// A run with concurrency key `key` of a plan whose steps have the
    /// given `max_in_flight`.
    fn keyed(limits: &[Option<u32>], key: &str) -> T {
        let mut def = plan(&vec![true; limits.len()], 1).def.clone();
        for (s, l) in def.steps.iter_mut().zip(limits) {
            s.max_in_flight = *l;
        }
        let mut t = T::with(Arc::new(FlowPlan::new(def, Vec::new())), Uuid::now_v7(), 3);
        Arc::make_mut(&mut t.m.rec).extras_mut().concurrency_key = Some(key.into());
        t
    }

    #[test]
    fn a_keyed_run_queues_until_its_slot_is_held() {
        let mut t = keyed(&[None], "account:42");
        let d = t.decide(Event::Start);
        let slot = "key.f.6163636f756e743a3432".to_owned();
        assert_eq!(names(&d.transitions), [format!("asked {slot}")]);
        assert_eq!(d.effects.last(), Some(&Effect::Acquire { slot: slot.clone(), limit: 1 }));
        assert_eq!(t.m.rec.status, RunStatus::Queued);
        let d = t.decide(Event::Slot { slot: slot.clone(), granted: false });
        assert!(d.transitions.is_empty());
        assert_eq!(d.effects, [Effect::AwaitSlot { slot: slot.clone() }]);
        // A takeover asks again (the store knows it).
        let d = t.decide(Event::Resume);
        assert!(d.effects.contains(&Effect::Acquire { slot: slot.clone(), limit: 1 }));
        let d = t.decide(Event::Slot { slot: slot.clone(), granted: true });
        assert_eq!(names(&d.transitions), [format!("taken {slot}"), "start 0 execute #1".into()]);
        assert_eq!(t.m.rec.status, RunStatus::Running);
        assert_eq!(names(&t.ok()), ["completed 0", "finished completed"]);
        assert_eq!(t.m.rec.extras().slots, [slot], "let go by the store when the run ends");
    }

    #[test]
    fn a_queued_run_can_be_cancelled_or_time_out() {
        let mut t = keyed(&[None], "k");
        t.ev(Event::Start);
        let slot = t.m.key_slot().unwrap().0;
        assert_eq!(names(&t.ev(cancel("ops"))), ["cancelled", "finished cancelled"]);
        // Its turn comes too late: nothing runs (the store let go of the
        // run's slots when it ended).
        let d = t.decide(Event::Slot { slot: slot.clone(), granted: true });
        assert!(d.transitions.is_empty() && d.effects.is_empty());
        assert_eq!(t.m.rec.extras().slots, [slot]);

        let mut t = keyed(&[None], "k");
        Arc::make_mut(&mut t.m.rec).extras_mut().timeout = Some(Duration::from_secs(5));
        t.ev(Event::Start);
        assert_eq!(names(&t.ev(Event::DeadlineExceeded)), ["expired", "finished failed"]);
        assert!(t.m.rec.extras().error.as_deref().unwrap().contains("while queued"));
    }

    #[test]
    fn a_limited_step_waits_for_a_slot_and_lets_go_after_each_attempt() {
        let mut t = keyed(&[None, Some(2)], "k");
        Arc::make_mut(&mut t.m.rec).extras_mut().concurrency_key = None;
        t.ev(Event::Start);
        let slot = "step.f.s1".to_owned();
        let d = t.decide(Event::Outcome {
            command_id: t.cur(),
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Completed { output: Payload::nil() },
        });
        assert_eq!(names(&d.transitions), ["completed 0".to_owned(), format!("asked {slot}")]);
        assert_eq!(d.effects.last(), Some(&Effect::Acquire { slot: slot.clone(), limit: 2 }));
        assert_eq!(t.m.rec.steps[1].status, StepStatus::Waiting);
        let d = t.decide(Event::Slot { slot: slot.clone(), granted: true });
        assert_eq!(names(&d.transitions), [format!("taken {slot}"), "start 1 execute #1".into()]);
        // A failed attempt lets go; its retry asks again.
        let d = t.decide(Event::Outcome {
            command_id: t.cur(),
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("boom", true)),
        });
        assert!(d.effects.contains(&Effect::Release { slot: slot.clone() }));
        let id = t.cur();
        assert_eq!(names(&t.ev(Event::RetryDue { command_id: id })), [format!("asked {slot}")]);
        t.ev(Event::Slot { slot: slot.clone(), granted: true });
        let d = t.decide(Event::Outcome {
            command_id: t.cur(),
            attempt: 2,
            kind: CommandKind::Execute,
            result: OutcomeResult::Completed { output: Payload::nil() },
        });
        assert!(d.effects.contains(&Effect::Release { slot }));
        assert_eq!(t.m.rec.status, RunStatus::Completed);
        // Compensations never wait for a slot.
        let mut t = keyed(&[Some(1), None], "k");
        Arc::make_mut(&mut t.m.rec).extras_mut().concurrency_key = None;
        t.ev(Event::Start);
        t.ev(Event::Slot { slot: "step.f.s0".into(), granted: true });
        t.ok();
        assert_eq!(names(&t.fail(false)), ["failed 1", "start 0 compensate #1"]);
    }

    fn remote() -> Liveness {
        remote_waiting(Duration::from_secs(300))
    }

    /// Remote handlers, waited for `worker_wait` at most.
    fn remote_waiting(worker_wait: Duration) -> Liveness {
        Liveness::Remote {
            ack_timeout: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(1),
            clock_skew: Duration::from_millis(500),
            worker_wait,
        }
    }

    fn kinds(fx: &[Effect]) -> Vec<&'static str> {
        fx.iter()
            .map(|e| match e {
                Effect::Send(_) => "send",
                Effect::Inquire(_) => "inquire",
                Effect::Watch { inquiry: false, .. } => "watch",
                Effect::Watch { inquiry: true, .. } => "watch-inquiry",
                Effect::Alive { .. } => "alive",
                Effect::Unwatch { .. } => "unwatch",
                Effect::RetryAfter { .. } => "retry-after",
                Effect::RunDeadline { .. } => "run-deadline",
                Effect::Notify(_) => "notify",
                Effect::Cancel(_) => "cancel",
                Effect::PauseDeadline { .. } => "pause-deadline",
                Effect::Finish { .. } => "finish",
                Effect::Acquire { .. } => "acquire",
                Effect::AwaitSlot { .. } => "await-slot",
                Effect::Release { .. } => "release",
            })
            .collect()
    }

    #[test]
    fn the_machine_decides_every_effect() {
        let mut t = T::new(&[true, false], 1);
        Arc::make_mut(&mut t.m.limits).liveness = remote();
        Arc::make_mut(&mut t.m.rec).extras_mut().timeout = Some(Duration::from_secs(30));
        let d = t.decide(Event::Start);
        assert_eq!(kinds(&d.effects), ["run-deadline", "notify", "send", "watch"]);
        let Some(Effect::Send(cmd)) = d.effects.get(2) else { panic!() };
        assert_eq!((cmd.step_index, cmd.attempt), (0, 1));
        assert!(cmd.start_by_ms.is_some(), "a remote command carries its start-by time");
        let Some(Effect::Watch { ack, .. }) = d.effects.get(3) else { panic!() };
        assert_eq!(*ack, Duration::from_millis(2500), "ack window plus clock skew");
        // The ack: no write needed first, and the silence timer.
        let id = t.cur();
        let d = t.decide(Event::Acked { command_id: id, worker: "w".into() });
        assert!(d.can_wait_to_be_written());
        assert_eq!(kinds(&d.effects), ["alive"]);
        // Heartbeats keep it alive, without transitions.
        let d = t.decide(Event::Heartbeat { command_id: id });
        assert!(d.transitions.is_empty());
        assert_eq!(kinds(&d.effects), ["alive"]);
        // A retry: notified, then due after its delay.
        let d = t.decide(Event::Outcome {
            command_id: id,
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Failed(StepFailure::new("boom", true)),
        });
        assert_eq!(kinds(&d.effects), ["unwatch", "notify", "retry-after"]);
        // Resumed while waiting for the retry: what is left of the delay.
        let d = t.decide(Event::Resume);
        assert_eq!(kinds(&d.effects), ["run-deadline", "retry-after"]);
        let id = t.cur();
        t.ev(Event::RetryDue { command_id: id });
        // Resumed with an attempt in flight: ask who holds it (once its
        // start-by time has passed, if it was never acked), never resend.
        let d = t.decide(Event::Resume);
        assert_eq!(kinds(&d.effects), ["run-deadline", "notify", "watch"]);
        let id = t.cur();
        t.ev(Event::Acked { command_id: id, worker: "w".into() });
        let d = t.decide(Event::Resume);
        assert_eq!(kinds(&d.effects), ["run-deadline", "notify", "inquire", "watch-inquiry"]);
        // In process: no timers at all.
        let mut local = T::new(&[false], 0);
        let d = local.decide(Event::Start);
        assert_eq!(kinds(&d.effects), ["notify", "send"]);
        let d = local.decide(Event::Outcome {
            command_id: local.cur(),
            attempt: 1,
            kind: CommandKind::Execute,
            result: OutcomeResult::Completed { output: Payload::nil() },
        });
        assert_eq!(kinds(&d.effects), ["unwatch", "notify", "finish"]);
    }

    #[test]
    fn every_decision_is_exercised_and_in_the_architecture_table() {
        COVERED.with(|c| c.borrow_mut().clear());
        let run = Uuid::from_u128(1);
        let mut t = T::with(plan(&[true, true, true, true], 5), run, 1);
        let mut other = T::with(plan(&[true, true], 5), Uuid::from_u128(2), 2);
        every_decision(&mut t, &mut other);
        let covered = COVERED.with(|c| c.borrow().clone());
        let missing: Vec<_> = DECISIONS.iter().filter(|d| !covered.contains(*d)).collect();
        assert!(missing.is_empty(), "decisions never exercised: {missing:?}");
        let table = include_str!("../../docs/architecture.md");
        let undocumented: Vec<_> =
            DECISIONS.iter().filter(|d| !table.contains(&format!("`{d}`"))).collect();
        assert!(
            undocumented.is_empty(),
            "decisions missing from docs/architecture.md: {undocumented:?}"
        );
    }

    #[test]
    fn the_same_events_and_entropy_replay_to_the_same_decisions() {
        let run = Uuid::from_u128(1);
        let mut t = T::with(plan(&[true, true, true, true], 5), run, 11);
        let mut other = T::with(plan(&[true, true], 5), Uuid::from_u128(2), 12);
        every_decision(&mut t, &mut other);
        // Replay each recorded history into a fresh machine with the same
        // entropy: the same transitions, command ids and delays included.
        for (recorded, seed, shape, id) in
            [(&t, 11, vec![true; 4], run), (&other, 12, vec![true; 2], Uuid::from_u128(2))]
        {
            let mut replay = T::with(plan(&shape, 5), id, seed);
            replay.m.plan = recorded.m.plan.clone();
            Arc::make_mut(&mut replay.m.rec).extras_mut().timeout = recorded.m.rec.extras().timeout;
            let mut out = Vec::new();
            for e in recorded.log.clone() {
                out.extend(replay.ev(e));
            }
            assert_eq!(*replay.m.rec, *recorded.m.rec, "the same record");
            assert!(!out.is_empty());
        }
        // Other entropy: other command ids, so the decisions did depend on it.
        let mut a = T::with(plan(&[true], 0), run, 1);
        let mut b = T::with(plan(&[true], 0), run, 2);
        a.ev(Event::Start);
        b.ev(Event::Start);
        assert_ne!(a.cur(), b.cur());
    }

    #[test]
    fn a_changed_flow_is_a_mismatch() {
        let t = T::new(&[true, false], 0);
        let shorter = plan(&[true], 0);
        assert!(Machine::mismatch(&t.m.plan, &t.m.rec).is_none());
        let why = Machine::mismatch(&shorter, &t.m.rec).unwrap();
        assert!(why.contains("[s0, s1]") && why.contains("now has [s0]"), "{why}");
    }

    #[test]
    fn compensation_skips_steps_without_one_and_goes_in_reverse() {
        let mut t = T::new(&[true, false, true, true, false], 0);
        t.ev(Event::Start);
        for _ in 0..4 {
            t.ok();
        }
        assert_eq!(names(&t.fail(false)), ["failed 4", "start 3 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 3", "start 2 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 2", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished failed"]);
        let st: Vec<_> = t.m.rec.steps.iter().map(|s| s.status).collect();
        use StepStatus::*;
        assert_eq!(st, [Compensated, Completed, Compensated, Compensated, Failed]);
    }

    #[test]
    fn a_failed_compensation_is_retried_then_marked_and_the_rest_go_on() {
        let mut t = T::new(&[true, true, false], 0);
        t.ev(Event::Start);
        t.ok();
        t.ok();
        assert_eq!(names(&t.fail(false)), ["failed 2", "start 1 compensate #1"]);
        assert_eq!(names(&t.fail(true)), ["retry 1"]);
        let id = t.cur();
        assert_eq!(names(&t.ev(Event::RetryDue { command_id: id })), ["start 1 compensate #2"]);
        assert_eq!(names(&t.fail(true)), ["compensation failed 1", "start 0 compensate #1"]);
        assert_eq!(names(&t.ok()), ["compensated 0", "finished compensation_failed"]);
        assert_eq!(t.m.rec.steps[1].compensation.as_ref().unwrap().attempts, 2);
    }

    #[test]
    fn the_deadline_fails_the_step_in_flight_but_never_a_compensation() {
        let mut t = T::new(&[true, false], 3);
        Arc::make_mut(&mut t.m.rec).extras_mut().timeout = Some(Duration::from_secs(1));
        t.ev(Event::Start);
        t.ok();
        t.fail(true); // waiting for a retry
        assert_eq!(names(&t.ev(Event::DeadlineExceeded)), ["failed 1", "start 0 compensate #1"]);
        assert!(t.ev(Event::DeadlineExceeded).is_empty());
        assert_eq!(t.m.rec.extras().error.as_deref(), Some("run deadline of 1s exceeded"));
    }

    #[test]
    fn finished_runs_ignore_everything() {
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let id = t.cur();
        t.ok();
        assert!(t.ev(Event::Start).is_empty());
        assert!(t.ev(Event::DeadlineExceeded).is_empty());
        assert!(t.ev(Event::Silent { command_id: id }).is_empty());
    }

    #[test]
    fn outputs_for_commands() {
        let mut t = T::new(&[true, true], 0);
        t.ev(Event::Start);
        t.ok();
        assert_eq!(t.m.outputs_for(1, CommandKind::Execute).len(), 1);
        assert_eq!(t.m.outputs_for(0, CommandKind::Execute).len(), 0);
        assert_eq!(t.m.outputs_for(0, CommandKind::Compensate).len(), 1);
    }
}
