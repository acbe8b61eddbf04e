//! The saga as a state machine: events in, transitions out.
//!
//! [`Machine::handle`] decides what an event means for the run and returns it
//! as [`Transition`]s, already applied to the record. It does no I/O and reads
//! no clock of its own, so each transition is tested directly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use orchestrix_proto::{CommandKind, OutcomeResult, RunStatus, StepOutput, StepStatus};
use tokio::time::Instant;
use uuid::Uuid;

use crate::record::{Current, Phase, RetryAt, RunRecord, Transition};
use crate::{FlowDef, Hooks, RetryPolicy};

/// A flow as the engine runs it: its definition and the hooks to call.
#[derive(Clone)]
pub(crate) struct FlowPlan {
    pub(crate) def: FlowDef,
    pub(crate) hooks: Vec<Arc<dyn Hooks>>,
}

/// What can happen to a run.
#[derive(Debug)]
pub(crate) enum Event {
    /// The run's actor started.
    Start,
    /// A worker (or the in-process bus) answered an attempt.
    Outcome { command_id: Uuid, result: OutcomeResult },
    /// An attempt is lost without an outcome: no ack, no heartbeat, past its time.
    AttemptLost { command_id: Uuid, reason: String },
    /// The delay before a retry is over.
    RetryDue { command_id: Uuid },
    /// The run's own deadline passed.
    DeadlineExceeded,
}

pub(crate) struct Machine {
    pub(crate) plan: Arc<FlowPlan>,
    /// Shared with the store that holds it; changed copy-on-write.
    pub(crate) rec: Arc<RunRecord>,
    pub(crate) run_started: Instant,
    /// Monotonic start of each step's first action attempt and first compensation attempt.
    first_attempt: Vec<(Option<Instant>, Option<Instant>)>,
    rng: fastrand::Rng,
}

impl Machine {
    pub(crate) fn new(plan: Arc<FlowPlan>, rec: Arc<RunRecord>, now: Instant) -> Self {
        let n = rec.steps.len();
        Machine {
            plan,
            rec,
            run_started: now,
            first_attempt: vec![(None, None); n],
            rng: fastrand::Rng::new(),
        }
    }

    /// A machine for a run read back from the store: its clocks are rebuilt
    /// from the record's wall-clock times.
    pub(crate) fn resumed(
        plan: Arc<FlowPlan>,
        rec: Arc<RunRecord>,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let ago = |t: SystemTime| {
            now.checked_sub(wall.duration_since(t).unwrap_or_default()).unwrap_or(now)
        };
        let mut m = Machine::new(plan, rec, now);
        m.run_started = ago(m.rec.started_at);
        for (slot, step) in m.first_attempt.iter_mut().zip(&m.rec.steps) {
            slot.0 = step.started_at.map(ago);
            if step.compensation.is_some() {
                slot.1 = Some(now);
            }
        }
        m
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.rec.phase == Phase::Finished
    }

    /// Decides what `event` means and appends the resulting transitions to `out`.
    pub(crate) fn handle(
        &mut self,
        event: Event,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Transition>,
    ) {
        if self.is_finished() {
            return;
        }
        match event {
            Event::Start => {
                if self.rec.current.is_none()
                    && self.rec.steps.iter().all(|s| s.status == StepStatus::NotRun)
                {
                    self.next_step(0, now, wall, out);
                }
            }
            Event::Outcome { command_id, result } => {
                let Some(cur) = self.in_flight(command_id) else { return };
                match result {
                    OutcomeResult::Completed { output } => {
                        let step = cur.step as usize;
                        match cur.kind {
                            CommandKind::Execute => {
                                let duration = self.since_first(step, cur.kind, now);
                                self.push(
                                    Transition::StepCompleted { step: cur.step, output, duration },
                                    out,
                                );
                                self.next_step(step + 1, now, wall, out);
                            }
                            CommandKind::Compensate => {
                                let duration = self.since_first(step, cur.kind, now);
                                self.push(
                                    Transition::CompensationCompleted { step: cur.step, duration },
                                    out,
                                );
                                self.next_compensation(step, now, wall, out);
                            }
                        }
                    }
                    OutcomeResult::Failed(f) => {
                        self.attempt_failed(cur, f.message, f.retryable, now, wall, out)
                    }
                }
            }
            Event::AttemptLost { command_id, reason } => {
                if let Some(cur) = self.in_flight(command_id) {
                    self.attempt_failed(cur, reason, true, now, wall, out);
                }
            }
            Event::RetryDue { command_id } => {
                let due = self
                    .rec
                    .current
                    .as_ref()
                    .filter(|c| c.command_id == command_id && c.retry_at.is_some())
                    .map(|c| (c.step, c.kind, c.attempt));
                if let Some((step, kind, attempt)) = due {
                    self.begin(step, kind, attempt + 1, now, wall, out);
                }
            }
            Event::DeadlineExceeded => {
                if self.rec.phase != Phase::Executing {
                    return; // compensation is never cut short
                }
                if let Some(cur) = self.rec.current.clone() {
                    let timeout = self.rec.timeout.unwrap_or_default();
                    let error = format!("run deadline of {timeout:?} exceeded");
                    self.attempt_failed(cur, error, false, now, wall, out);
                }
            }
        }
    }

    /// The attempt `command_id` if it is the one in flight (not a stale or
    /// duplicate answer, and not one already failed and waiting for its retry).
    fn in_flight(&self, command_id: Uuid) -> Option<Current> {
        self.rec
            .current
            .as_ref()
            .filter(|c| c.command_id == command_id && c.retry_at.is_none())
            .cloned()
    }

    fn push(&mut self, t: Transition, out: &mut Vec<Transition>) {
        Arc::make_mut(&mut self.rec).apply(&t);
        out.push(t);
    }

    fn since_first(&self, step: usize, kind: CommandKind, now: Instant) -> Duration {
        let (exec, comp) = self.first_attempt[step];
        let first = match kind {
            CommandKind::Execute => exec,
            CommandKind::Compensate => comp,
        };
        first.map(|t| now.saturating_duration_since(t)).unwrap_or_default()
    }

    fn begin(
        &mut self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Transition>,
    ) {
        let slot = &mut self.first_attempt[step as usize];
        match kind {
            CommandKind::Execute => slot.0.get_or_insert(now),
            CommandKind::Compensate => slot.1.get_or_insert(now),
        };
        let command_id = Uuid::new_v4();
        self.push(Transition::AttemptStarted { step, kind, attempt, command_id, at: wall }, out);
    }

    fn next_step(
        &mut self,
        from: usize,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Transition>,
    ) {
        if from < self.rec.steps.len() {
            self.begin(from as u32, CommandKind::Execute, 1, now, wall, out);
        } else {
            self.finish(now, out);
        }
    }

    /// Compensates the nearest completed step with a compensation below `below`, or finishes.
    fn next_compensation(
        &mut self,
        below: usize,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Transition>,
    ) {
        let next = (0..below).rev().find(|&i| {
            self.rec.steps[i].status == StepStatus::Completed && self.plan.def.steps[i].compensable
        });
        match next {
            Some(i) => self.begin(i as u32, CommandKind::Compensate, 1, now, wall, out),
            None => self.finish(now, out),
        }
    }

    fn policy(&self, step: usize, kind: CommandKind) -> &RetryPolicy {
        let def = &self.plan.def.steps[step];
        match kind {
            CommandKind::Execute => &def.retry,
            CommandKind::Compensate => &def.compensation_retry,
        }
    }

    fn attempt_failed(
        &mut self,
        cur: Current,
        error: String,
        retryable: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Transition>,
    ) {
        let step = cur.step as usize;
        let elapsed = self.since_first(step, cur.kind, now);
        if retryable {
            let policy = self.policy(step, cur.kind).clone();
            let delay = policy.delay_for(cur.attempt, &mut self.rng);
            if policy.allows_retry(cur.attempt, elapsed, delay) {
                let retry = RetryAt { at: wall + delay, delay };
                self.push(
                    Transition::RetryScheduled { step: cur.step, kind: cur.kind, error, retry },
                    out,
                );
                return;
            }
        }
        match cur.kind {
            CommandKind::Execute => {
                self.push(Transition::StepFailed { step: cur.step, error, duration: elapsed }, out);
                self.next_compensation(step, now, wall, out);
            }
            CommandKind::Compensate => {
                self.push(
                    Transition::CompensationFailed { step: cur.step, error, duration: elapsed },
                    out,
                );
                // Keep undoing the earlier steps: each side effect that can be
                // undone is, and the report names the one that could not.
                self.next_compensation(step, now, wall, out);
            }
        }
    }

    fn finish(&mut self, now: Instant, out: &mut Vec<Transition>) {
        let status = if self.rec.failed_step.is_none() {
            RunStatus::Completed
        } else if self.rec.steps.iter().any(|s| s.status == StepStatus::CompensationFailed) {
            RunStatus::CompensationFailed
        } else {
            RunStatus::Failed
        };
        let duration = now.saturating_duration_since(self.run_started);
        self.push(Transition::Finished { status, duration }, out);
    }

    /// The outputs a command for `step` of `kind` carries: those of the earlier
    /// completed steps, and for a compensation the step's own output too.
    pub(crate) fn outputs_for(&self, step: usize, kind: CommandKind) -> Vec<StepOutput> {
        let upto = match kind {
            CommandKind::Execute => step,
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
            s.retry = RetryPolicy::new().retries(retries).delay(Duration::from_millis(10));
            s.compensation_retry = RetryPolicy::new().retries(1).delay(Duration::from_millis(10));
            def.steps.push(s);
        }
        Arc::new(FlowPlan { def, hooks: Vec::new() })
    }

    struct T {
        m: Machine,
        now: Instant,
    }

    impl T {
        fn new(compensable: &[bool], retries: u32) -> Self {
            let plan = plan(compensable, retries);
            let rec = Arc::new(RunRecord::new(
                Uuid::now_v7(),
                &plan.def,
                Payload::nil(),
                SystemTime::now(),
            ));
            let now = Instant::now();
            T { m: Machine::new(plan, rec, now), now }
        }
        fn ev(&mut self, e: Event) -> Vec<Transition> {
            let mut out = Vec::new();
            self.m.handle(e, self.now, SystemTime::now(), &mut out);
            out
        }
        fn cur(&self) -> Uuid {
            self.m.rec.current.as_ref().unwrap().command_id
        }
        fn ok(&mut self) -> Vec<Transition> {
            let id = self.cur();
            self.ev(Event::Outcome {
                command_id: id,
                result: OutcomeResult::Completed { output: Payload::nil() },
            })
        }
        fn fail(&mut self, retryable: bool) -> Vec<Transition> {
            let id = self.cur();
            let f = StepFailure { message: "boom".into(), retryable };
            self.ev(Event::Outcome { command_id: id, result: OutcomeResult::Failed(f) })
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
            })
            .collect()
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
        // While waiting, the failed attempt's late answers are ignored.
        assert!(t.ok().is_empty());
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
        assert!(t.ev(Event::Outcome { command_id: stale, result: ok }).is_empty());
        assert!(t.ev(Event::RetryDue { command_id: stale }).is_empty());
        assert!(t.ev(Event::AttemptLost { command_id: stale, reason: "x".into() }).is_empty());
        // A retry timer for the attempt in flight (not waiting) is ignored too.
        let id = t.cur();
        assert!(t.ev(Event::RetryDue { command_id: id }).is_empty());
    }

    #[test]
    fn lost_attempts_are_retryable_failures() {
        let mut t = T::new(&[false], 1);
        t.ev(Event::Start);
        let id = t.cur();
        assert_eq!(
            names(&t.ev(Event::AttemptLost { command_id: id, reason: "no ack".into() })),
            ["retry 0"]
        );
        assert_eq!(t.m.rec.steps[0].error.as_deref(), Some("no ack"));
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
        Arc::make_mut(&mut t.m.rec).timeout = Some(Duration::from_secs(1));
        t.ev(Event::Start);
        t.ok();
        t.fail(true); // waiting for a retry
        assert_eq!(names(&t.ev(Event::DeadlineExceeded)), ["failed 1", "start 0 compensate #1"]);
        assert!(t.ev(Event::DeadlineExceeded).is_empty());
        assert_eq!(t.m.rec.error.as_deref(), Some("run deadline of 1s exceeded"));
    }

    #[test]
    fn finished_runs_ignore_everything() {
        let mut t = T::new(&[false], 0);
        t.ev(Event::Start);
        let id = t.cur();
        t.ok();
        assert!(t.ev(Event::Start).is_empty());
        assert!(t.ev(Event::DeadlineExceeded).is_empty());
        assert!(t.ev(Event::AttemptLost { command_id: id, reason: "x".into() }).is_empty());
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
