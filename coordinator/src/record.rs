//! The durable state of a run and the transitions that change it.
//!
//! A run's state is a `RunRecord`; it changes only by applying
//! `Transition`s, in the actor and, identically, in the store. A store that
//! keeps the transitions (or the record they produce) can rebuild a run exactly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use orchestrix_proto::time::{opt_duration_ms, unix_ms_serde};
use orchestrix_proto::{
    CommandKind, CompensationReport, OperatorAction, Payload, RunReport, RunStatus, StepReport,
    StepStatus,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use orchestrix_proto::FlowDef;

/// Which half of the saga a run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running the steps' actions in order.
    Executing,
    /// A step failed for good: compensating completed steps in reverse order.
    Compensating,
    /// Terminal.
    Finished,
}

/// The attempt a run is waiting on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Current {
    /// Step index.
    pub step: u32,
    /// Execute or compensate.
    pub kind: CommandKind,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Id of the command sent for this attempt.
    pub command_id: Uuid,
    /// Set once the attempt failed and a retry is scheduled for this time
    /// (boxed: most attempts in flight wait for no retry; stored the same).
    #[serde(default)]
    pub retry_at: Option<Box<RetryAt>>,
    /// The worker that acknowledged the command, i.e. started its handler.
    /// Until then nobody started it, and it may be sent again elsewhere.
    #[serde(default)]
    pub acked_by: Option<String>,
    /// When the attempt was first sent (bounds the wait for a worker).
    #[serde(with = "orchestrix_proto::time::opt_unix_ms", default)]
    pub sent_at: Option<SystemTime>,
    /// Times the command was sent again because no worker took it.
    #[serde(default)]
    pub redispatches: u32,
}

/// An answer about an attempt the run had already given up on: kept in the
/// run's history, never applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LateNote {
    /// The command answered.
    pub command_id: Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// Execute or compensate.
    pub kind: CommandKind,
    /// What the answer said.
    pub outcome: String,
    /// When it arrived.
    #[serde(with = "unix_ms_serde")]
    pub at: SystemTime,
}

impl LateNote {
    /// The note for an answer about `command_id` that came too late.
    pub fn new(
        command_id: Uuid,
        attempt: u32,
        kind: CommandKind,
        result: &orchestrix_proto::OutcomeResult,
        at: SystemTime,
    ) -> Self {
        let outcome = match result {
            orchestrix_proto::OutcomeResult::Completed { .. } => "completed".to_owned(),
            // Kept short: the record holds up to MAX_LATE_NOTES of them.
            orchestrix_proto::OutcomeResult::Failed(f) => {
                bounded(format!("failed: {}", f.message), 256)
            }
        };
        LateNote { command_id, attempt, kind, outcome, at }
    }

    /// The note as one line of the report.
    pub fn line(&self) -> String {
        format!(
            "{} attempt {} (command {}) answered after it was given up on: {}",
            self.kind.as_str(),
            self.attempt,
            self.command_id,
            self.outcome
        )
    }
}

/// The attempts in flight, as a list or (records written before parallel
/// groups) as one attempt or none.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Current>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<Current>),
        One(Box<Current>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(c)) => vec![*c],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// `text` cut to at most `max` bytes (on a character boundary), marked `…`:
/// what comes from workers is kept bounded in the record.
pub(crate) fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Late answers kept per run, at most.
pub const MAX_LATE_NOTES: usize = 16;

/// A scheduled retry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryAt {
    /// When the next attempt is due.
    #[serde(with = "unix_ms_serde")]
    pub at: SystemTime,
    /// The delay that was chosen.
    #[serde(with = "orchestrix_proto::time::duration_ms")]
    pub delay: Duration,
}

/// One step of a run.
///
/// What few steps use (why the step waits, where retries count from after a
/// resume) is kept apart, behind one pointer: see [`StepRecord::extras`].
/// The stored form does not show it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Step name.
    pub name: Arc<str>,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts of the action.
    pub attempts: u32,
    /// Output once completed.
    pub output: Option<Payload>,
    /// Start of the first attempt: see [`StepRecord::started_at`].
    started_at: Nanos,
    /// First attempt to final outcome: see [`StepRecord::duration`].
    duration: Nanos,
    /// The compensation, once started (boxed: most steps never have one).
    pub compensation: Option<Box<CompensationReport>>,
    /// Some attempt had an unknown outcome and the step did not complete
    /// afterwards: it may have had its effect, so rollback compensates it.
    pub maybe_done: bool,
    /// The parallel group the step belongs to, if any.
    pub group: Option<Arc<str>>,
    /// The rest, when any of it is set.
    extras: Rare<StepExtras>,
}

/// The fields of a [`StepRecord`] that most steps leave empty: read them
/// with [`StepRecord::extras`], set them with [`StepRecord::extras_mut`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepExtras {
    /// Error of the last failed attempt.
    pub error: Option<String>,
    /// Why the step waits (while it does): for the report.
    pub waiting: Option<String>,
    /// Attempts of the action before its last resume: retries count from here.
    pub retry_base: u32,
    /// The same for the compensation.
    pub compensation_retry_base: u32,
}

/// A time (since the Unix epoch) or a duration in nanoseconds, `u64::MAX`
/// for none: half the room of an `Option<SystemTime>` or `Option<Duration>`,
/// to the same precision (times before 1970 read as 1970, as they are stored).
/// It holds up to ≈ 584 years (year 2554 for a time): a stored value beyond
/// that, which no clock or run produces, is kept as that bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Nanos(u64);

impl Nanos {
    const NONE: Nanos = Nanos(u64::MAX);

    fn of_duration(d: Option<Duration>) -> Nanos {
        d.map_or(Nanos::NONE, |d| Nanos(d.as_nanos().min(u64::MAX as u128 - 1) as u64))
    }

    fn duration(self) -> Option<Duration> {
        (self != Nanos::NONE).then(|| Duration::from_nanos(self.0))
    }

    fn of_time(t: Option<SystemTime>) -> Nanos {
        Nanos::of_duration(t.map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()))
    }

    fn time(self) -> Option<SystemTime> {
        self.duration().map(|d| SystemTime::UNIX_EPOCH + d)
    }
}

/// What a step without extras reads as.
static NO_STEP_EXTRAS: StepExtras =
    StepExtras { error: None, waiting: None, retry_base: 0, compensation_retry_base: 0 };

impl StepRecord {
    /// A step of that name (in that group) that has not run yet.
    pub fn new(name: Arc<str>, group: Option<Arc<str>>) -> Self {
        StepRecord {
            name,
            status: StepStatus::NotRun,
            attempts: 0,
            output: None,
            started_at: Nanos::NONE,
            duration: Nanos::NONE,
            compensation: None,
            maybe_done: false,
            group,
            extras: Rare::default(),
        }
    }

    /// Start of the first attempt.
    pub fn started_at(&self) -> Option<SystemTime> {
        self.started_at.time()
    }

    /// Sets the start of the first attempt.
    pub fn set_started_at(&mut self, at: Option<SystemTime>) {
        self.started_at = Nanos::of_time(at);
    }

    /// First attempt to final outcome.
    pub fn duration(&self) -> Option<Duration> {
        self.duration.duration()
    }

    /// Sets the time from first attempt to final outcome.
    pub fn set_duration(&mut self, duration: Option<Duration>) {
        self.duration = Nanos::of_duration(duration);
    }

    /// The fields most steps leave empty (all empty when none is set).
    pub fn extras(&self) -> &StepExtras {
        self.extras.get()
    }

    /// The fields most steps leave empty, to change (they take room from
    /// here on).
    pub fn extras_mut(&mut self) -> &mut StepExtras {
        self.extras.get_mut()
    }

    /// Clears why the step waits, if it did.
    fn not_waiting(&mut self) {
        if let Some(x) = self.extras.0.as_deref_mut() {
            x.waiting = None;
        }
    }
}

/// A step as written: its fields in their stored order (see [`wire`]).
mod step_wire {
    use super::*;

    fn is_none<T>(v: &&Option<T>) -> bool {
        v.is_none()
    }

    /// Encodes a step without copying it.
    #[derive(Serialize)]
    #[serde(rename = "StepRecord")]
    pub(super) struct Out<'a> {
        name: &'a Arc<str>,
        status: StepStatus,
        attempts: u32,
        error: &'a Option<String>,
        output: &'a Option<Payload>,
        #[serde(with = "orchestrix_proto::time::opt_unix_ms")]
        started_at: Option<SystemTime>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        compensation: &'a Option<Box<CompensationReport>>,
        maybe_done: bool,
        waiting: &'a Option<String>,
        retry_base: u32,
        compensation_retry_base: u32,
        #[serde(skip_serializing_if = "is_none")]
        group: &'a Option<Arc<str>>,
    }

    impl<'a> From<&'a StepRecord> for Out<'a> {
        fn from(s: &'a StepRecord) -> Self {
            let x = s.extras();
            Out {
                name: &s.name,
                status: s.status,
                attempts: s.attempts,
                error: &x.error,
                output: &s.output,
                started_at: s.started_at(),
                duration: s.duration(),
                compensation: &s.compensation,
                maybe_done: s.maybe_done,
                waiting: &x.waiting,
                retry_base: x.retry_base,
                compensation_retry_base: x.compensation_retry_base,
                group: &s.group,
            }
        }
    }

    /// Decodes a step.
    #[derive(Deserialize)]
    #[serde(rename = "StepRecord")]
    pub(super) struct In {
        name: Arc<str>,
        status: StepStatus,
        attempts: u32,
        error: Option<String>,
        output: Option<Payload>,
        #[serde(with = "orchestrix_proto::time::opt_unix_ms")]
        started_at: Option<SystemTime>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        compensation: Option<Box<CompensationReport>>,
        #[serde(default)]
        maybe_done: bool,
        #[serde(default)]
        waiting: Option<String>,
        #[serde(default)]
        retry_base: u32,
        #[serde(default)]
        compensation_retry_base: u32,
        #[serde(default)]
        group: Option<Arc<str>>,
    }

    impl From<In> for StepRecord {
        fn from(w: In) -> Self {
            let extras = StepExtras {
                error: w.error,
                waiting: w.waiting,
                retry_base: w.retry_base,
                compensation_retry_base: w.compensation_retry_base,
            };
            StepRecord {
                name: w.name,
                status: w.status,
                attempts: w.attempts,
                output: w.output,
                started_at: Nanos::of_time(w.started_at),
                duration: Nanos::of_duration(w.duration),
                compensation: w.compensation,
                maybe_done: w.maybe_done,
                group: w.group,
                extras: Rare::of(extras),
            }
        }
    }
}

impl Serialize for StepRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        step_wire::Out::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for StepRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        step_wire::In::deserialize(d).map(StepRecord::from)
    }
}

/// A run paused when a step's (or compensation's) retries ran out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// The step.
    pub step: u32,
    /// Its action or its compensation.
    pub kind: CommandKind,
    /// The last attempt's error.
    pub error: String,
    /// When it paused.
    #[serde(with = "unix_ms_serde")]
    pub since: SystemTime,
    /// When it rolls back on its own, if ever.
    #[serde(with = "orchestrix_proto::time::opt_unix_ms", default)]
    pub until: Option<SystemTime>,
}

/// The durable state of one run.
///
/// The fields most runs leave empty (idempotency key, deadline, operator
/// actions, pause, slots…) are kept apart, behind one pointer: see
/// [`RunRecord::extras`]. The stored form does not show it: it is the same
/// map of named fields as ever, in the same order.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// The run's id.
    pub run_id: Uuid,
    /// Flow name.
    pub flow: Arc<str>,
    /// The version of the flow the run is pinned to (`None` in records
    /// written before versions existed: the flow's current definition).
    pub version: Option<Arc<str>>,
    /// The run's input.
    pub input: Payload,
    /// When the run started.
    pub started_at: SystemTime,
    /// Where the run stands.
    pub status: RunStatus,
    /// Executing, compensating or finished.
    pub phase: Phase,
    /// One per step of the flow, in order.
    pub steps: Vec<StepRecord>,
    /// The attempts in flight or waiting for their retry: one at most per
    /// step, several while a parallel group runs. (Records written before
    /// groups held one attempt or none: both read.)
    pub current: Vec<Current>,
    /// Total duration, once finished.
    pub duration: Option<Duration>,
    /// The rest, when any of it is set.
    extras: Rare<RunExtras>,
    /// Transitions applied since the run began (see [`RunRecord::seq`]).
    seq: u32,
}

/// The fields of a [`RunRecord`] that most runs leave empty, kept behind one
/// pointer so that a run without them does not carry their room: read them
/// with [`RunRecord::extras`], set them with [`RunRecord::extras_mut`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunExtras {
    /// Idempotency key, if any.
    pub key: Option<String>,
    /// How long the key outlives the run.
    pub ttl: Option<Duration>,
    /// Deadline of the run, from its start.
    pub timeout: Option<Duration>,
    /// Trace context of whoever started the run, for its span's parent.
    pub traceparent: Option<String>,
    /// Answers that came after their attempt was given up on (at most
    /// [`MAX_LATE_NOTES`]).
    pub late: Vec<LateNote>,
    /// What operators did to the run, in order.
    pub actions: Vec<OperatorAction>,
    /// Set while the run waits for an operator.
    pub paused: Option<PauseRecord>,
    /// The run's concurrency key, if any.
    pub concurrency_key: Option<String>,
    /// Every slot the run asked for (see [`crate::slots`]): what is left of
    /// them is let go when the run ends, whatever happened in between.
    pub slots: Vec<String>,
    /// Attempts waiting for their step's slot (`max_in_flight`).
    pub slot_waits: Vec<SlotWait>,
    /// Why the run failed (the error of the step that failed for good, or
    /// why it was stopped).
    pub error: Option<String>,
    /// Index of the step that failed for good.
    pub failed_step: Option<u32>,
}

/// What a record without extras reads as.
static NO_EXTRAS: RunExtras = RunExtras {
    key: None,
    ttl: None,
    timeout: None,
    traceparent: None,
    late: Vec::new(),
    actions: Vec::new(),
    paused: None,
    concurrency_key: None,
    slots: Vec::new(),
    slot_waits: Vec::new(),
    error: None,
    failed_step: None,
};

/// Fields that are rarely set, boxed when any is: none and all empty
/// are the same.
#[derive(Clone)]
struct Rare<T: Empty>(Option<Box<T>>);

/// Extras with a shared all-empty value.
trait Empty: Default + PartialEq + 'static {
    /// All empty.
    fn empty() -> &'static Self;
}

impl Empty for RunExtras {
    fn empty() -> &'static Self {
        &NO_EXTRAS
    }
}

impl Empty for StepExtras {
    fn empty() -> &'static Self {
        &NO_STEP_EXTRAS
    }
}

impl<T: Empty> Default for Rare<T> {
    fn default() -> Self {
        Rare(None)
    }
}

impl<T: Empty> Rare<T> {
    /// Boxed only if not empty.
    fn of(value: T) -> Self {
        Rare((value != *T::empty()).then(|| Box::new(value)))
    }

    fn get(&self) -> &T {
        self.0.as_deref().unwrap_or(T::empty())
    }

    fn get_mut(&mut self) -> &mut T {
        self.0.get_or_insert_with(Box::default)
    }
}

impl<T: Empty> PartialEq for Rare<T> {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl<T: Empty + std::fmt::Debug> std::fmt::Debug for Rare<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl RunRecord {
    /// The fields most runs leave empty (all empty when none is set).
    pub fn extras(&self) -> &RunExtras {
        self.extras.get()
    }

    /// The fields most runs leave empty, to change (they take room from
    /// here on).
    pub fn extras_mut(&mut self) -> &mut RunExtras {
        self.extras.get_mut()
    }

    /// How many transitions the record has been through: of two copies of
    /// one run's record, the one with more is the newer. Every copy of a run
    /// descends from its one start, and only the run's owner applies
    /// transitions, so a copy held by a coordinator presumed dead, or left
    /// in its journal, never counts more than the record a taker moved on
    /// from it. The store uses it never to put an older copy over a newer one
    /// (0: a record written before it was counted, which proves nothing).
    pub fn seq(&self) -> u32 {
        self.seq
    }
}

/// A record as written: the fields in their stored order, as they were
/// declared before the rare ones moved behind a pointer. Encoding and
/// decoding go through it (and only through it), so the stored form stays
/// the same byte for byte.
mod wire {
    use super::*;

    fn is_none<T>(v: &&Option<T>) -> bool {
        v.is_none()
    }

    fn is_empty<T>(v: &&Vec<T>) -> bool {
        v.is_empty()
    }

    fn is_zero(v: &u32) -> bool {
        *v == 0
    }

    /// Encodes a record without copying it.
    #[derive(Serialize)]
    #[serde(rename = "RunRecord")]
    pub(super) struct Out<'a> {
        run_id: &'a Uuid,
        flow: &'a Arc<str>,
        version: &'a Option<Arc<str>>,
        input: &'a Payload,
        key: &'a Option<String>,
        #[serde(with = "opt_duration_ms")]
        ttl: Option<Duration>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
        #[serde(with = "unix_ms_serde")]
        started_at: SystemTime,
        status: RunStatus,
        phase: Phase,
        steps: &'a Vec<StepRecord>,
        current: &'a Vec<Current>,
        error: &'a Option<String>,
        failed_step: Option<u32>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        traceparent: &'a Option<String>,
        late: &'a Vec<LateNote>,
        actions: &'a Vec<OperatorAction>,
        paused: &'a Option<PauseRecord>,
        #[serde(skip_serializing_if = "is_none")]
        concurrency_key: &'a Option<String>,
        #[serde(skip_serializing_if = "is_empty")]
        slots: &'a Vec<String>,
        #[serde(skip_serializing_if = "is_empty")]
        slot_waits: &'a Vec<SlotWait>,
        #[serde(skip_serializing_if = "is_zero")]
        seq: u32,
    }

    impl<'a> From<&'a RunRecord> for Out<'a> {
        fn from(r: &'a RunRecord) -> Self {
            let x = r.extras();
            Out {
                run_id: &r.run_id,
                flow: &r.flow,
                version: &r.version,
                input: &r.input,
                key: &x.key,
                ttl: x.ttl,
                timeout: x.timeout,
                started_at: r.started_at,
                status: r.status,
                phase: r.phase,
                steps: &r.steps,
                current: &r.current,
                error: &x.error,
                failed_step: x.failed_step,
                duration: r.duration,
                traceparent: &x.traceparent,
                late: &x.late,
                actions: &x.actions,
                paused: &x.paused,
                concurrency_key: &x.concurrency_key,
                slots: &x.slots,
                slot_waits: &x.slot_waits,
                seq: r.seq,
            }
        }
    }

    /// Decodes a record.
    #[derive(Deserialize)]
    #[serde(rename = "RunRecord")]
    pub(super) struct In {
        run_id: Uuid,
        flow: Arc<str>,
        #[serde(default)]
        version: Option<Arc<str>>,
        input: Payload,
        key: Option<String>,
        #[serde(with = "opt_duration_ms")]
        ttl: Option<Duration>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
        #[serde(with = "unix_ms_serde")]
        started_at: SystemTime,
        status: RunStatus,
        phase: Phase,
        steps: Vec<StepRecord>,
        #[serde(deserialize_with = "one_or_many", default)]
        current: Vec<Current>,
        error: Option<String>,
        failed_step: Option<u32>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        #[serde(default)]
        traceparent: Option<String>,
        #[serde(default)]
        late: Vec<LateNote>,
        #[serde(default)]
        actions: Vec<OperatorAction>,
        #[serde(default)]
        paused: Option<PauseRecord>,
        #[serde(default)]
        concurrency_key: Option<String>,
        #[serde(default)]
        slots: Vec<String>,
        #[serde(default)]
        slot_waits: Vec<SlotWait>,
        #[serde(default)]
        seq: u32,
    }

    impl From<In> for RunRecord {
        fn from(w: In) -> Self {
            let extras = RunExtras {
                key: w.key,
                ttl: w.ttl,
                timeout: w.timeout,
                traceparent: w.traceparent,
                late: w.late,
                actions: w.actions,
                paused: w.paused,
                concurrency_key: w.concurrency_key,
                slots: w.slots,
                slot_waits: w.slot_waits,
                error: w.error,
                failed_step: w.failed_step,
            };
            RunRecord {
                run_id: w.run_id,
                flow: w.flow,
                version: w.version,
                input: w.input,
                started_at: w.started_at,
                status: w.status,
                phase: w.phase,
                steps: w.steps,
                current: w.current,
                duration: w.duration,
                extras: Rare::of(extras),
                seq: w.seq,
            }
        }
    }
}

impl Serialize for RunRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire::Out::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for RunRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        wire::In::deserialize(d).map(RunRecord::from)
    }
}

/// An attempt of a step with `max_in_flight` that waits for a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotWait {
    /// The slot.
    pub slot: String,
    /// Step index.
    pub step: u32,
    /// The attempt to start once the slot is held.
    pub attempt: u32,
}

/// One change to a [`RunRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// An attempt's command is about to be sent.
    AttemptStarted {
        /// Step index.
        step: u32,
        /// Execute or compensate.
        kind: CommandKind,
        /// Attempt number.
        attempt: u32,
        /// The command's id.
        command_id: Uuid,
        /// When.
        #[serde(with = "unix_ms_serde")]
        at: SystemTime,
    },
    /// A worker acknowledged the attempt: its handler started.
    AttemptAcked {
        /// The command.
        command_id: Uuid,
        /// The worker.
        worker: String,
    },
    /// No worker took the attempt's command in time (nobody started it): it is
    /// sent again under a new id, without spending an attempt.
    Redispatched {
        /// Step index.
        #[serde(default)]
        step: u32,
        /// The new command id.
        command_id: Uuid,
        /// Why, for the report while the run waits.
        note: String,
    },
    /// The attempt failed; another is scheduled.
    RetryScheduled {
        /// Step index.
        step: u32,
        /// Execute or compensate.
        kind: CommandKind,
        /// Why the attempt failed.
        error: String,
        /// When the next attempt is due.
        retry: RetryAt,
        /// The attempt's outcome is unknown (it may have had its effect).
        #[serde(default)]
        unknown: bool,
    },
    /// An answer about an attempt already given up on.
    LateOutcome(LateNote),
    /// The step's action completed.
    StepCompleted {
        /// Step index.
        step: u32,
        /// Its output.
        output: Payload,
        /// First attempt to outcome.
        #[serde(with = "orchestrix_proto::time::duration_ms")]
        duration: Duration,
    },
    /// The step's action failed for good; the run turns to compensation.
    StepFailed {
        /// Step index.
        step: u32,
        /// Why.
        error: String,
        /// First attempt to outcome.
        #[serde(with = "orchestrix_proto::time::duration_ms")]
        duration: Duration,
        /// The last attempt's outcome is unknown: the step may have happened.
        #[serde(default)]
        maybe_done: bool,
    },
    /// The step's compensation completed.
    CompensationCompleted {
        /// Step index.
        step: u32,
        /// First compensation attempt to outcome.
        #[serde(with = "orchestrix_proto::time::duration_ms")]
        duration: Duration,
    },
    /// The step's compensation failed for good.
    CompensationFailed {
        /// Step index.
        step: u32,
        /// Why.
        error: String,
        /// First compensation attempt to outcome.
        #[serde(with = "orchestrix_proto::time::duration_ms")]
        duration: Duration,
    },
    /// An operator cancelled the run: the attempts in flight are stopped
    /// (one [`Transition::Stopped`] each) and the rollback starts.
    Cancelled {
        /// Who, why, when.
        action: OperatorAction,
    },
    /// A step in flight or waiting was stopped: the run was cancelled, or
    /// another step of its parallel group failed for good.
    Stopped {
        /// Step index.
        step: u32,
        /// Its attempt had been sent and not answered: it may have happened.
        maybe_done: bool,
    },
    /// A step's (or compensation's) retries ran out: the run waits for an operator.
    Paused(PauseRecord),
    /// An operator resumed a paused run: its step is tried again with a fresh
    /// budget of attempts.
    Resumed {
        /// Who, when.
        action: OperatorAction,
    },
    /// A paused run rolls back (an operator asked, or its pause timed out):
    /// the step's failure (or the compensation's) follows.
    RolledBack {
        /// Who, when.
        action: OperatorAction,
    },
    /// An operator resumed the rollback of a run that ended
    /// `compensation_failed`: the compensations that failed are tried again
    /// (those that succeeded never are).
    Reopened {
        /// Who, when.
        action: OperatorAction,
    },
    /// The run asked for a slot: its concurrency key's (`step: None`; the
    /// run is `queued` until it holds it) or a step's (`max_in_flight`; the
    /// step waits with `attempt` to start).
    SlotAsked {
        /// The slot.
        slot: String,
        /// The step whose attempt waits, if a step's slot.
        step: Option<u32>,
        /// That attempt's number.
        attempt: u32,
    },
    /// The run holds the slot: a queued run is running, a waiting attempt
    /// starts (its `AttemptStarted` follows).
    SlotTaken {
        /// The slot.
        slot: String,
    },
    /// The run's deadline passed while it waited for a slot of its key.
    Expired {
        /// Why.
        error: String,
    },
    /// The run reached a terminal status.
    Finished {
        /// The terminal status.
        status: RunStatus,
        /// Start to end.
        #[serde(with = "orchestrix_proto::time::duration_ms")]
        duration: Duration,
    },
}

impl RunRecord {
    /// The record of a run of `flow` that is about to start.
    pub fn new(run_id: Uuid, flow: &FlowDef, input: Payload, started_at: SystemTime) -> Self {
        RunRecord {
            run_id,
            flow: flow.name.clone(),
            version: None,
            input,
            started_at,
            status: RunStatus::Running,
            phase: Phase::Executing,
            steps: flow
                .steps
                .iter()
                .map(|s| StepRecord::new(s.name.clone(), s.group.clone()))
                .collect(),
            current: Vec::new(),
            duration: None,
            extras: Rare::default(),
            seq: 0,
        }
    }

    /// Applies one transition. The only way a record changes.
    pub fn apply(&mut self, t: &Transition) {
        // Saturating: 4 billion transitions are out of reach of one run.
        self.seq = self.seq.saturating_add(1);
        match t {
            Transition::AttemptStarted { step, kind, attempt, command_id, at } => {
                self.current.retain(|c| c.step != *step);
                self.current.push(Current {
                    step: *step,
                    kind: *kind,
                    attempt: *attempt,
                    command_id: *command_id,
                    retry_at: None,
                    acked_by: None,
                    sent_at: Some(*at),
                    redispatches: 0,
                });
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    match kind {
                        CommandKind::Execute => {
                            s.status = StepStatus::Running;
                            s.attempts = *attempt;
                            if s.started_at().is_none() {
                                s.set_started_at(Some(*at));
                            }
                        }
                        CommandKind::Compensate => {
                            s.status = StepStatus::Compensating;
                            s.compensation
                                .get_or_insert_with(|| {
                                    Box::new(CompensationReport {
                                        attempts: 0,
                                        error: None,
                                        duration: None,
                                    })
                                })
                                .attempts = *attempt;
                        }
                    }
                }
            }
            Transition::AttemptAcked { command_id, worker } => {
                if let Some(c) = self.current.iter_mut().find(|c| c.command_id == *command_id) {
                    c.acked_by = Some(worker.clone());
                    let step = c.step;
                    if let Some(s) = self.steps.get_mut(step as usize)
                        && s.status == StepStatus::Waiting
                    {
                        s.status = StepStatus::Running;
                        s.not_waiting();
                    }
                }
            }
            Transition::Redispatched { step, command_id, note } => {
                let Some(c) = self.current.iter_mut().find(|c| c.step == *step) else { return };
                c.command_id = *command_id;
                c.acked_by = None;
                c.redispatches += 1;
                let (step, kind) = (c.step, c.kind);
                if let (Some(s), CommandKind::Execute) = (self.steps.get_mut(step as usize), kind) {
                    s.status = StepStatus::Waiting;
                    s.extras_mut().waiting = Some(note.clone());
                }
            }
            Transition::LateOutcome(note) => {
                let x = self.extras_mut();
                if x.late.len() < MAX_LATE_NOTES {
                    x.late.push(note.clone());
                }
            }
            Transition::RetryScheduled { step, kind, error, retry, unknown } => {
                if let Some(c) = self.current.iter_mut().find(|c| c.step == *step) {
                    c.retry_at = Some(Box::new(*retry));
                }
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    match kind {
                        CommandKind::Execute => {
                            s.extras_mut().error = Some(error.clone());
                            s.maybe_done |= *unknown;
                        }
                        CommandKind::Compensate => {
                            if let Some(c) = &mut s.compensation {
                                c.error = Some(error.clone());
                            }
                        }
                    }
                }
            }
            Transition::StepCompleted { step, output, duration } => {
                self.current.retain(|c| c.step != *step);
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    s.status = StepStatus::Completed;
                    s.maybe_done = false;
                    s.output = Some(output.clone());
                    s.set_duration(Some(*duration));
                }
            }
            Transition::StepFailed { step, error, duration, maybe_done } => {
                self.current.retain(|c| c.step != *step);
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.slot_waits.retain(|w| w.step != *step);
                }
                self.phase = Phase::Compensating;
                let x = self.extras_mut();
                x.error = Some(error.clone());
                x.failed_step = Some(*step);
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    s.maybe_done |= *maybe_done;
                    s.status = if s.maybe_done { StepStatus::Unknown } else { StepStatus::Failed };
                    s.extras_mut().error = Some(error.clone());
                    s.set_duration(Some(*duration));
                }
            }
            Transition::CompensationCompleted { step, duration } => {
                self.current.retain(|c| c.step != *step);
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    s.status = StepStatus::Compensated;
                    if let Some(c) = &mut s.compensation {
                        c.duration = Some(*duration);
                    }
                }
            }
            Transition::CompensationFailed { step, error, duration } => {
                self.current.retain(|c| c.step != *step);
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    s.status = StepStatus::CompensationFailed;
                    if let Some(c) = &mut s.compensation {
                        c.error = Some(error.clone());
                        c.duration = Some(*duration);
                    }
                }
            }
            Transition::Cancelled { action } => {
                self.extras_mut().actions.push(action.clone());
                if self.phase != Phase::Executing {
                    return; // a rollback under way goes on unchanged
                }
                self.phase = Phase::Compensating;
                self.status = RunStatus::Running;
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.paused = None;
                }
                let why = action.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                self.extras_mut().error = Some(format!("cancelled by {}{why}", action.by));
            }
            Transition::Stopped { step, maybe_done } => {
                self.current.retain(|c| c.step != *step);
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.slot_waits.retain(|w| w.step != *step);
                }
                if let Some(s) = self.steps.get_mut(*step as usize) {
                    s.maybe_done |= *maybe_done;
                    s.status =
                        if s.maybe_done { StepStatus::Unknown } else { StepStatus::Cancelled };
                    s.not_waiting();
                }
            }
            Transition::Paused(p) => {
                self.current.retain(|c| c.step != p.step);
                self.status = RunStatus::Paused;
                if let Some(s) = self.steps.get_mut(p.step as usize) {
                    s.status = StepStatus::Paused;
                    match p.kind {
                        CommandKind::Execute => s.extras_mut().error = Some(p.error.clone()),
                        CommandKind::Compensate => {
                            if let Some(c) = &mut s.compensation {
                                c.error = Some(p.error.clone());
                            }
                        }
                    }
                }
                self.extras_mut().paused = Some(p.clone());
            }
            Transition::Resumed { action } => {
                self.extras_mut().actions.push(action.clone());
                self.status = RunStatus::Running;
                if let Some(p) = self.extras.0.as_deref_mut().and_then(|x| x.paused.take())
                    && let Some(s) = self.steps.get_mut(p.step as usize)
                {
                    match p.kind {
                        CommandKind::Execute => s.extras_mut().retry_base = s.attempts,
                        CommandKind::Compensate => {
                            s.extras_mut().compensation_retry_base =
                                s.compensation.as_ref().map_or(0, |c| c.attempts)
                        }
                    }
                }
            }
            Transition::RolledBack { action } => {
                self.extras_mut().actions.push(action.clone());
                self.status = RunStatus::Running;
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.paused = None;
                }
            }
            Transition::Reopened { action } => {
                self.extras_mut().actions.push(action.clone());
                self.phase = Phase::Compensating;
                self.status = RunStatus::Running;
                self.duration = None;
                self.current.clear();
                for s in &mut self.steps {
                    if s.status == StepStatus::CompensationFailed {
                        // Its action's effect is in place: to be compensated again.
                        s.status = StepStatus::Completed;
                        let base = s.compensation.as_ref().map_or(0, |c| c.attempts);
                        if base != s.extras().compensation_retry_base {
                            s.extras_mut().compensation_retry_base = base;
                        }
                    }
                }
            }
            Transition::SlotAsked { slot, step, attempt } => {
                let x = self.extras_mut();
                if !x.slots.contains(slot) {
                    x.slots.push(slot.clone());
                }
                match step {
                    None => self.status = RunStatus::Queued,
                    Some(step) => {
                        x.slot_waits.retain(|w| w.step != *step);
                        x.slot_waits.push(SlotWait {
                            slot: slot.clone(),
                            step: *step,
                            attempt: *attempt,
                        });
                        if let Some(s) = self.steps.get_mut(*step as usize) {
                            s.status = StepStatus::Waiting;
                            s.extras_mut().waiting = Some(
                                "waiting for a slot: the step's attempts in flight are at its limit (max_in_flight)"
                                    .to_owned(),
                            );
                        }
                    }
                }
            }
            Transition::SlotTaken { slot } => {
                if self.status == RunStatus::Queued {
                    self.status = RunStatus::Running;
                }
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.slot_waits.retain(|w| w.slot != *slot);
                }
            }
            Transition::Expired { error } => {
                self.phase = Phase::Compensating;
                self.status = RunStatus::Running;
                self.extras_mut().error = Some(error.clone());
            }
            Transition::Finished { status, duration } => {
                self.current.clear();
                if let Some(x) = self.extras.0.as_deref_mut() {
                    x.slot_waits.clear();
                }
                self.phase = Phase::Finished;
                self.status = *status;
                self.duration = Some(*duration);
            }
        }
    }

    /// The report of a run set aside for an operator: status `quarantined`,
    /// `reason` as its error, its duration so far.
    pub fn quarantined_report(&self, reason: String) -> RunReport {
        let ran = SystemTime::now().duration_since(self.started_at).unwrap_or_default();
        let mut report = self.to_report(ran);
        report.status = RunStatus::Quarantined;
        report.error = Some(reason);
        report
    }

    /// The report of the run as it stands. `elapsed` stands in for the
    /// duration while the run is still going.
    pub fn to_report(&self, elapsed: Duration) -> RunReport {
        RunReport {
            run_id: self.run_id.into(),
            flow: self.flow.to_string(),
            version: self.version.as_deref().map(str::to_owned),
            status: self.status,
            duration: self.duration.unwrap_or(elapsed),
            started_at: Some(self.started_at),
            error: self.extras().error.clone(),
            failed_step: self
                .extras()
                .failed_step
                .and_then(|i| self.steps.get(i as usize))
                .map(|s| s.name.to_string()),
            steps: self
                .steps
                .iter()
                .map(|s| StepReport {
                    name: s.name.to_string(),
                    status: s.status,
                    attempts: s.attempts,
                    error: s.extras().error.clone(),
                    output: s.output.clone(),
                    started_at: s.started_at(),
                    duration: s.duration(),
                    compensation: s.compensation.as_deref().cloned(),
                    waiting: s.extras().waiting.clone().filter(|_| s.status == StepStatus::Waiting),
                    group: s.group.as_deref().map(str::to_owned),
                })
                .collect(),
            late: self.extras().late.iter().map(LateNote::line).collect(),
            actions: self.extras().actions.clone(),
            paused: self.extras().paused.as_ref().map(|p| orchestrix_proto::PauseReport {
                step: self
                    .steps
                    .get(p.step as usize)
                    .map(|s| s.name.to_string())
                    .unwrap_or_default(),
                kind: p.kind,
                since: p.since,
                until: p.until,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before parallel groups held one attempt or none
    /// under `current`: they still read, as a list of one or none.
    #[test]
    fn a_record_with_one_attempt_in_flight_still_reads() {
        #[derive(Serialize)]
        struct Before {
            current: Option<Current>,
        }
        #[derive(Deserialize)]
        struct Now {
            #[serde(deserialize_with = "one_or_many", default)]
            current: Vec<Current>,
        }
        let c = Current {
            step: 2,
            kind: CommandKind::Compensate,
            attempt: 3,
            command_id: Uuid::now_v7(),
            retry_at: None,
            acked_by: Some("w1".into()),
            sent_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            redispatches: 1,
        };
        let read = |b: &Before| {
            let bytes = rmp_serde::to_vec_named(b).unwrap();
            rmp_serde::from_slice::<Now>(&bytes).unwrap().current
        };
        assert_eq!(read(&Before { current: Some(c.clone()) }), vec![c.clone()]);
        assert_eq!(read(&Before { current: None }), Vec::<Current>::new());
        let bytes = rmp_serde::to_vec_named(&serde_json::json!({})).unwrap();
        assert!(rmp_serde::from_slice::<Now>(&bytes).unwrap().current.is_empty());
    }

    /// The record as it was declared before its rare fields moved behind a
    /// pointer: what is stored must not change, either way.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct OldRunRecord {
        run_id: Uuid,
        flow: Arc<str>,
        #[serde(default)]
        version: Option<Arc<str>>,
        input: Payload,
        key: Option<String>,
        #[serde(with = "opt_duration_ms")]
        ttl: Option<Duration>,
        #[serde(with = "opt_duration_ms")]
        timeout: Option<Duration>,
        #[serde(with = "unix_ms_serde")]
        started_at: SystemTime,
        status: RunStatus,
        phase: Phase,
        steps: Vec<OldStepRecord>,
        #[serde(deserialize_with = "one_or_many", default)]
        current: Vec<Current>,
        error: Option<String>,
        failed_step: Option<u32>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        #[serde(default)]
        traceparent: Option<String>,
        #[serde(default)]
        late: Vec<LateNote>,
        #[serde(default)]
        actions: Vec<OperatorAction>,
        #[serde(default)]
        paused: Option<PauseRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        concurrency_key: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        slots: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        slot_waits: Vec<SlotWait>,
    }

    /// The step as it was declared before its rare fields moved behind a pointer.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct OldStepRecord {
        name: Arc<str>,
        status: StepStatus,
        attempts: u32,
        error: Option<String>,
        output: Option<Payload>,
        #[serde(with = "orchestrix_proto::time::opt_unix_ms")]
        started_at: Option<SystemTime>,
        #[serde(with = "opt_duration_ms")]
        duration: Option<Duration>,
        compensation: Option<Box<CompensationReport>>,
        #[serde(default)]
        maybe_done: bool,
        #[serde(default)]
        waiting: Option<String>,
        #[serde(default)]
        retry_base: u32,
        #[serde(default)]
        compensation_retry_base: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<Arc<str>>,
    }

    fn old_step(s: &StepRecord) -> OldStepRecord {
        let x = s.extras().clone();
        OldStepRecord {
            name: s.name.clone(),
            status: s.status,
            attempts: s.attempts,
            error: s.extras().error.clone(),
            output: s.output.clone(),
            started_at: s.started_at(),
            duration: s.duration(),
            compensation: s.compensation.clone(),
            maybe_done: s.maybe_done,
            waiting: x.waiting,
            retry_base: x.retry_base,
            compensation_retry_base: x.compensation_retry_base,
            group: s.group.clone(),
        }
    }

    fn old_of(r: &RunRecord) -> OldRunRecord {
        let x = r.extras().clone();
        OldRunRecord {
            run_id: r.run_id,
            flow: r.flow.clone(),
            version: r.version.clone(),
            input: r.input.clone(),
            key: x.key,
            ttl: x.ttl,
            timeout: x.timeout,
            started_at: r.started_at,
            status: r.status,
            phase: r.phase,
            steps: r.steps.iter().map(old_step).collect(),
            current: r.current.clone(),
            error: x.error,
            failed_step: x.failed_step,
            duration: r.duration,
            traceparent: x.traceparent,
            late: x.late,
            actions: x.actions,
            paused: x.paused,
            concurrency_key: x.concurrency_key,
            slots: x.slots,
            slot_waits: x.slot_waits,
        }
    }

    /// Whole milliseconds, as stored: what a decoded record holds.
    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn sample(full: bool) -> RunRecord {
        let mut def = orchestrix_proto::FlowDef::new("f");
        def.steps = vec![orchestrix_proto::StepDef::new("a"), orchestrix_proto::StepDef::new("b")];
        let mut r = RunRecord::new(
            Uuid::now_v7(),
            &def,
            Payload::encode(&42u32).unwrap(),
            at(1_800_000_000_123),
        );
        r.version = Some("v1".into());
        r.current.push(Current {
            step: 1,
            kind: CommandKind::Execute,
            attempt: 2,
            command_id: Uuid::now_v7(),
            retry_at: Some(Box::new(RetryAt {
                at: at(1_800_000_001_000),
                delay: Duration::from_millis(250),
            })),
            acked_by: Some("w1".into()),
            sent_at: Some(at(1_800_000_000_500)),
            redispatches: 1,
        });
        r.steps[0].status = StepStatus::Completed;
        r.steps[0].attempts = 1;
        r.steps[0].output = Some(Payload::encode(&"out").unwrap());
        r.steps[0].set_started_at(Some(at(1_800_000_000_200)));
        r.steps[0].set_duration(Some(Duration::from_millis(7)));
        r.duration = Some(Duration::from_millis(99));
        if full {
            r.steps[1].extras_mut().error = Some("boom".into());
            r.extras_mut().error = Some("e".into());
            r.extras_mut().failed_step = Some(1);
            let action = OperatorAction {
                action: orchestrix_proto::ControlAction::Cancel,
                by: "ops".into(),
                reason: Some("why".into()),
                at: at(1_800_000_002_000),
            };
            let x = r.extras_mut();
            x.key = Some("order-1".into());
            x.ttl = Some(Duration::from_secs(60));
            x.timeout = Some(Duration::from_secs(30));
            x.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
            x.late.push(LateNote {
                command_id: Uuid::now_v7(),
                attempt: 1,
                kind: CommandKind::Execute,
                outcome: "completed".into(),
                at: at(1_800_000_003_000),
            });
            x.actions.push(action);
            x.paused = Some(PauseRecord {
                step: 1,
                kind: CommandKind::Compensate,
                error: "stuck".into(),
                since: at(1_800_000_004_000),
                until: Some(at(1_800_000_005_000)),
            });
            x.concurrency_key = Some("account:1".into());
            x.slots.push("f/account:1".into());
            x.slot_waits.push(SlotWait { slot: "f/b".into(), step: 1, attempt: 3 });
            let s = &mut r.steps[1];
            s.group = Some("g".into());
            s.maybe_done = true;
            s.compensation = Some(Box::new(CompensationReport {
                attempts: 2,
                error: Some("undo failed".into()),
                duration: Some(Duration::from_millis(5)),
            }));
            let x = s.extras_mut();
            x.waiting = Some("waiting for a slot".into());
            x.retry_base = 2;
            x.compensation_retry_base = 1;
        }
        r
    }

    /// Boxing the rare fields changed nothing that is stored: the same bytes
    /// (MessagePack with names and without, JSON), and each form reads the
    /// other's.
    #[test]
    fn the_stored_form_of_a_record_is_unchanged() {
        for full in [true, false] {
            let new = sample(full);
            let old = old_of(&new);
            let named = rmp_serde::to_vec_named(&new).unwrap();
            assert_eq!(named, rmp_serde::to_vec_named(&old).unwrap(), "full: {full}");
            let compact = rmp_serde::to_vec(&new).unwrap();
            assert_eq!(compact, rmp_serde::to_vec(&old).unwrap(), "full: {full}");
            let json = serde_json::to_vec(&new).unwrap();
            assert_eq!(json, serde_json::to_vec(&old).unwrap(), "full: {full}");
            // Each reads what the other wrote.
            assert_eq!(rmp_serde::from_slice::<RunRecord>(&named).unwrap(), new);
            assert_eq!(rmp_serde::from_slice::<RunRecord>(&compact).unwrap(), new);
            assert_eq!(serde_json::from_slice::<RunRecord>(&json).unwrap(), new);
            assert_eq!(rmp_serde::from_slice::<OldRunRecord>(&named).unwrap(), old);
            assert_eq!(serde_json::from_slice::<OldRunRecord>(&json).unwrap(), old);
            // A record without extras keeps none after a round trip.
            let back = rmp_serde::from_slice::<RunRecord>(&named).unwrap();
            assert_eq!(back.extras.0.is_some(), full);
            assert_eq!(back.steps[1].extras.0.is_some(), full);
            assert!(back.steps[0].extras.0.is_none());
        }
        // Nothing set but an empty box reads as nothing set.
        let mut empty = sample(false);
        empty.extras_mut();
        empty.steps[0].extras_mut();
        assert_eq!(empty, sample_like(&empty));
    }

    fn sample_like(r: &RunRecord) -> RunRecord {
        let mut c = r.clone();
        c.extras = Rare::default();
        for s in &mut c.steps {
            s.extras = Rare::default();
        }
        c
    }

    /// A step's times keep their precision in memory, and none stays none.
    #[test]
    fn step_times_keep_their_precision() {
        let mut s = StepRecord::new("a".into(), None);
        assert_eq!((s.started_at(), s.duration()), (None, None));
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let d = Duration::new(3, 7);
        s.set_started_at(Some(t));
        s.set_duration(Some(d));
        assert_eq!((s.started_at(), s.duration()), (Some(t), Some(d)));
        s.set_duration(Some(Duration::ZERO));
        assert_eq!(s.duration(), Some(Duration::ZERO));
        s.set_started_at(None);
        assert_eq!(s.started_at(), None);
    }

    /// Errors alone (the only rare fields of a run that failed) keep their
    /// stored form, read back, and reach the report.
    #[test]
    fn errors_alone_are_stored_as_before_and_reported() {
        let mut r = sample(false);
        r.steps[1].extras_mut().error = Some("boom".into());
        r.extras_mut().error = Some("e".into());
        r.extras_mut().failed_step = Some(1);
        let old = old_of(&r);
        let named = rmp_serde::to_vec_named(&r).unwrap();
        assert_eq!(named, rmp_serde::to_vec_named(&old).unwrap());
        assert_eq!(rmp_serde::to_vec(&r).unwrap(), rmp_serde::to_vec(&old).unwrap());
        assert_eq!(serde_json::to_vec(&r).unwrap(), serde_json::to_vec(&old).unwrap());
        let back = rmp_serde::from_slice::<RunRecord>(&named).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.extras().error.as_deref(), Some("e"));
        assert_eq!(back.extras().failed_step, Some(1));
        assert_eq!(back.steps[1].extras().error.as_deref(), Some("boom"));
        let rep = back.to_report(Duration::ZERO);
        assert_eq!(rep.error.as_deref(), Some("e"));
        assert_eq!(rep.failed_step.as_deref(), Some(&*r.steps[1].name));
        assert_eq!(rep.steps[1].error.as_deref(), Some("boom"));
        // Only the failed step.
        let mut r = sample(false);
        r.extras_mut().failed_step = Some(0);
        let back = rmp_serde::from_slice::<RunRecord>(&rmp_serde::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.extras().failed_step, Some(0));
    }

    /// What a parked run holds, kept from growing back unnoticed (see
    /// "Memory" in `docs/benchmarks.md`; 64-bit targets).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_record_stays_small() {
        assert!(std::mem::size_of::<RunRecord>() <= 176, "{}", std::mem::size_of::<RunRecord>());
        assert!(std::mem::size_of::<StepRecord>() <= 104, "{}", std::mem::size_of::<StepRecord>());
        assert!(std::mem::size_of::<Current>() <= 80, "{}", std::mem::size_of::<Current>());
    }
}
