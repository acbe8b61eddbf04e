use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Message, Payload, RunReport, time};

/// Whether a command runs a step's action or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Run the step's handler.
    Execute,
    /// Run the step's compensation.
    Compensate,
}

impl CommandKind {
    /// `"execute"` or `"compensate"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Execute => "execute",
            CommandKind::Compensate => "compensate",
        }
    }
}

/// The output a completed step produced, passed along to later steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepOutput {
    /// Name of the step that produced it.
    pub step: Arc<str>,
    /// The step's output.
    pub output: Payload,
}

/// Coordinator → worker: run one attempt of a step or of its compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepCommand {
    /// Unique per attempt; workers de-duplicate on it.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// The run this attempt belongs to.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Flow name.
    pub flow: Arc<str>,
    /// The version of the flow the run is pinned to (see [`crate::FlowDef::version`]).
    #[serde(default)]
    pub version: Arc<str>,
    /// Step name.
    pub step: Arc<str>,
    /// Position of the step in the flow, from 0.
    pub step_index: u32,
    /// Execute or compensate.
    pub kind: CommandKind,
    /// Attempt number of this kind for this step, from 1.
    pub attempt: u32,
    /// The run's input.
    pub input: Payload,
    /// Outputs of the steps that completed before this one (for a compensation:
    /// including the step's own output).
    pub outputs: Vec<StepOutput>,
    /// Time budget of this attempt, counted from when the worker starts it.
    /// `nil` when the step has no timeout.
    #[serde(with = "time::opt_duration_ms", default, rename = "timeoutMs")]
    pub timeout: Option<Duration>,
    /// Unix ms after which no worker may *start* this command: the coordinator
    /// sends it again elsewhere once it passes without an ack. `nil`: no limit.
    #[serde(default)]
    pub start_by_ms: Option<u64>,
    /// Unix ms at which the attempt is over whatever happens (the step's
    /// timeout from when it was sent, or the run's deadline): a worker neither
    /// starts it after that nor lets its handler run past it. `nil`: none.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// The sender reads [`Acks`]: commands received together may be
    /// acknowledged by one `step.acks`. Written only when true; coordinators
    /// older than this field said so with the header
    /// [`headers::ACKS`](crate::headers::ACKS) instead.
    #[serde(
        default,
        skip_serializing_if = "std::ops::Not::not",
        deserialize_with = "nil_is_false"
    )]
    pub acks: bool,
    /// `false`: the run was left out by the trace sampler, so the worker
    /// makes no spans for it (said here rather than with a `traceparent`
    /// header flagged not sampled, which would cost every such command a
    /// header to parse). `nil` or absent: as the `traceparent` header says,
    /// or, with none, the worker's own tracing decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<bool>,
    /// The run's W3C trace context for this command (the coordinator's
    /// attempt span), when the run is sampled: the `traceparent` a worker
    /// makes its span's parent. In the body rather than a NATS header,
    /// which every client that receives the command would parse into a map
    /// (and the server handle as a message with headers). Coordinators
    /// older than this field sent it as the header
    /// [`headers::TRACEPARENT`](crate::headers::TRACEPARENT), which workers
    /// still read when the field is absent. Advisory, as W3C trace context
    /// is: a value that is not a string reads as absent, and one that does
    /// not parse is ignored; neither costs the command.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "text_or_none")]
    pub traceparent: Option<String>,
}

/// A string, or `None` for anything else (nil included).
fn text_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Text::deserialize(d)? {
        Text::Text(s) => Some(s),
        Text::Other(_) => None,
    })
}

/// A flag that may be written `nil` (as absent: false), as a JavaScript
/// sender's `null` is.
fn nil_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Message for StepCommand {
    const KIND: &'static str = "step.command";

    fn decode_fast(bytes: &[u8]) -> Option<Self> {
        crate::fast::step_command(bytes)
    }

    fn encode_fast(&self, buf: &mut Vec<u8>) -> Option<()> {
        crate::fast::write_step_command(self, buf)
    }
}

/// Worker → coordinator: a command was received and will be run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The command being acknowledged.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its attempt number.
    pub attempt: u32,
    /// Identity of the worker process, for logs.
    pub worker: String,
}

impl Message for Ack {
    const KIND: &'static str = "step.ack";

    fn decode_fast(bytes: &[u8]) -> Option<Self> {
        crate::fast::ack(bytes)
    }

    fn encode_fast(&self, buf: &mut Vec<u8>) -> Option<()> {
        crate::fast::write_ack(self, buf)
    }
}

/// Worker → coordinator: several commands, received together, will each be
/// run: one message where as many [`Ack`]s would be. A worker sends it only
/// in answer to commands that carried the header
/// [`headers::ACKS`](crate::headers::ACKS) (the coordinator reads it), and
/// only for commands that share a reply subject; it goes out, like an
/// [`Ack`], before any of their handlers starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Acks {
    /// Identity of the worker process, for logs.
    pub worker: String,
    /// The commands acknowledged, in the order they arrived.
    pub commands: Vec<Acked>,
}

/// One command of an [`Acks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Acked {
    /// The command being acknowledged.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its attempt number.
    pub attempt: u32,
}

impl Acks {
    /// The acks this message stands for, one per command.
    pub fn acks(&self) -> impl Iterator<Item = Ack> + '_ {
        self.commands.iter().map(|c| Ack {
            command_id: c.command_id,
            run_id: c.run_id,
            attempt: c.attempt,
            worker: self.worker.clone(),
        })
    }
}

impl Message for Acks {
    const KIND: &'static str = "step.acks";

    fn decode_fast(bytes: &[u8]) -> Option<Self> {
        crate::fast::acks(bytes)
    }

    fn encode_fast(&self, buf: &mut Vec<u8>) -> Option<()> {
        crate::fast::write_acks(self, buf)
    }
}

/// Worker → coordinator: a long-running command is still being worked on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The command in progress.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its attempt number.
    pub attempt: u32,
    /// Identity of the worker process.
    pub worker: String,
}

impl Message for Heartbeat {
    const KIND: &'static str = "step.heartbeat";
}

/// Why a step attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepFailure {
    /// Human-readable error message.
    pub message: String,
    /// False for a permanent error: no further attempts are made.
    pub retryable: bool,
    /// True when the handler may have had its side effect all the same: it
    /// was stopped at its deadline, or its output could not be kept. The
    /// coordinator treats such an attempt as an **unknown outcome**.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maybe_done: bool,
}

impl StepFailure {
    /// A failure that did not happen (no side effect).
    pub fn new(message: impl Into<String>, retryable: bool) -> Self {
        StepFailure { message: message.into(), retryable, maybe_done: false }
    }

    /// A failure after which the side effect may have happened.
    pub fn maybe_done(message: impl Into<String>) -> Self {
        StepFailure { message: message.into(), retryable: true, maybe_done: true }
    }
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum OutcomeResult {
    /// The handler returned successfully.
    Completed {
        /// The handler's output (`nil` for `()`).
        output: Payload,
    },
    /// The handler failed, timed out or panicked.
    Failed(StepFailure),
}

/// Worker → coordinator: how an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepOutcome {
    /// The command this answers.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its attempt number.
    pub attempt: u32,
    /// Execute or compensate.
    pub kind: CommandKind,
    /// What happened.
    pub result: OutcomeResult,
}

impl Message for StepOutcome {
    const KIND: &'static str = "step.outcome";

    fn decode_fast(bytes: &[u8]) -> Option<Self> {
        crate::fast::step_outcome(bytes)
    }

    fn encode_fast(&self, buf: &mut Vec<u8>) -> Option<()> {
        crate::fast::write_step_outcome(self, buf)
    }
}

/// Caller → coordinator: start a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRequest {
    /// Name of a flow the coordinator knows.
    pub flow: String,
    /// The version of the flow to run; `nil`: the newest one with a live worker.
    #[serde(default)]
    pub version: Option<String>,
    /// The run's input.
    pub input: Payload,
    /// Idempotency key: a second request with the same key gets the first run.
    #[serde(default)]
    pub key: Option<String>,
    /// How long the key is remembered after its run ended.
    #[serde(with = "time::opt_duration_ms", default, rename = "ttlMs")]
    pub ttl: Option<Duration>,
    /// Deadline for the whole run, relative to its start.
    #[serde(with = "time::opt_duration_ms", default, rename = "timeoutMs")]
    pub timeout: Option<Duration>,
    /// Answer with the final report rather than at once with the run id.
    #[serde(default)]
    pub wait: bool,
    /// Unix ms after which the caller no longer waits for the answer: a
    /// coordinator that gets the request later (it was frozen, say) refuses
    /// it rather than start a run nobody knows about. `nil`: no limit.
    #[serde(default)]
    pub start_by_ms: Option<u64>,
    /// Concurrency key: runs of the flow with the same key run at most the
    /// flow's limit per key at a time; the others queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
}

impl RunRequest {
    /// A start of `flow` with `input` and no options: answered at once, no
    /// key, no deadline, the newest served version.
    pub fn new(flow: impl Into<String>, input: Payload) -> Self {
        RunRequest {
            flow: flow.into(),
            version: None,
            input,
            key: None,
            ttl: None,
            timeout: None,
            wait: false,
            start_by_ms: None,
            concurrency_key: None,
        }
    }
}

impl Message for RunRequest {
    const KIND: &'static str = "run.request";
}

/// Caller → coordinator: the report of a run so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRequest {
    /// The run asked about.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Answer once the run has finished, rather than with its report so far.
    #[serde(default)]
    pub wait: bool,
}

impl Message for StatusRequest {
    const KIND: &'static str = "run.status";
}

/// Caller → coordinator: recent runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRequest {
    /// Only runs in this status.
    #[serde(default)]
    pub status: Option<crate::RunStatus>,
    /// Only runs of this flow.
    #[serde(default)]
    pub flow: Option<String>,
    /// At most this many.
    pub limit: u32,
    /// Only runs older than this one (the cursor of the next page).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::uuid_text::option")]
    pub before: Option<Uuid>,
}

impl Message for ListRequest {
    const KIND: &'static str = "run.list";
}

/// Coordinator → caller: the answer to a [`RunRequest`], [`StatusRequest`] or [`ListRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum RunReply {
    /// The run was started (or found by its key) and is identified by this id.
    Accepted {
        /// The run's id.
        run_id: Uuid,
        /// The idempotency key named an earlier run: nothing new started,
        /// this is that run.
        duplicate: bool,
    },
    /// The run's report (final, or so far for a status request).
    Report(Box<RunReport>),
    /// Reports of several runs, newest first (for a list request).
    List(Vec<RunReport>),
    /// The request was refused.
    Rejected {
        /// Why, in words.
        error: String,
        /// True when the same request may succeed later (the store was
        /// unavailable, say). A start with an idempotency key is then safe to
        /// send again: it either starts the run or finds it.
        retryable: bool,
        /// Machine-readable reason, one of the `RunReply::CODE_*`
        /// constants; empty from coordinators older than it.
        code: String,
    },
}

impl RunReply {
    /// No flow of that name is served.
    pub const CODE_UNKNOWN_FLOW: &'static str = "unknown_flow";
    /// The flow has no such version.
    pub const CODE_UNKNOWN_VERSION: &'static str = "unknown_version";
    /// No run with that id is kept.
    pub const CODE_UNKNOWN_RUN: &'static str = "unknown_run";
    /// The request does not decode, has expired, or has a bad option.
    pub const CODE_BAD_REQUEST: &'static str = "bad_request";
    /// The run's input is refused (does not decode, too large).
    pub const CODE_BAD_INPUT: &'static str = "bad_input";
    /// The action does not apply to the run as it stands (it finished, say).
    pub const CODE_REFUSED: &'static str = "refused";
    /// The coordinator cannot do it now (its store is unavailable).
    pub const CODE_UNAVAILABLE: &'static str = "unavailable";
    /// Anything else.
    pub const CODE_OTHER: &'static str = "other";

    /// A refusal with its code.
    pub fn rejected(code: &str, error: impl std::fmt::Display) -> RunReply {
        let retryable = code == Self::CODE_UNAVAILABLE;
        RunReply::Rejected { error: error.to_string(), retryable, code: code.to_owned() }
    }
}

impl Message for RunReply {
    const KIND: &'static str = "run.reply";
}

/// Any side → the sender of a message that could not be used: why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireError {
    /// What was wrong, in words.
    pub message: String,
    /// Machine-readable reason, one of the [`WireError`] `CODE_*` constants.
    #[serde(default)]
    pub code: String,
    /// The command refused, when it could be read.
    #[serde(default, with = "crate::uuid_text::option")]
    pub command_id: Option<Uuid>,
    /// Its run, when it could be read.
    #[serde(default, with = "crate::uuid_text::option")]
    pub run_id: Option<Uuid>,
}

impl WireError {
    /// The message could not be decoded (nothing was run).
    pub const CODE_MALFORMED: &'static str = "malformed";
    /// The command arrived after its `start_by_ms` or `deadline_ms` (nothing was run).
    pub const CODE_EXPIRED: &'static str = "expired";
    /// An inquiry about a command this worker does not hold (nothing was run here).
    pub const CODE_UNKNOWN_COMMAND: &'static str = "unknown_command";
    /// The worker has no handler for this command (nothing was run).
    pub const CODE_NO_HANDLER: &'static str = "no_handler";

    /// An error about a message that could not be read at all.
    pub fn malformed(message: impl Into<String>) -> Self {
        WireError {
            message: message.into(),
            code: Self::CODE_MALFORMED.into(),
            command_id: None,
            run_id: None,
        }
    }

    /// An error about one command.
    pub fn about(cmd: &StepCommand, code: &str, message: impl Into<String>) -> Self {
        WireError {
            message: message.into(),
            code: code.into(),
            command_id: Some(cmd.command_id),
            run_id: Some(cmd.run_id),
        }
    }
}

impl Message for WireError {
    const KIND: &'static str = "error";
}

/// What happened in a run, as published on `{prefix}.events.{run_id}`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The run started.
    RunStarted,
    /// An attempt of a step's action was sent.
    StepStarted {
        /// Step name.
        step: String,
        /// Attempt number.
        attempt: u32,
        /// The parallel group the step runs in, if any.
        group: Option<String>,
    },
    /// An attempt (action or compensation) failed; another follows after `delay_ms`.
    Retry {
        /// Step name.
        step: String,
        /// `execute` or `compensate`.
        kind: CommandKind,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
        /// Delay before the next attempt.
        delay_ms: u64,
    },
    /// A step's action completed.
    StepCompleted {
        /// Step name.
        step: String,
        /// Attempts it took.
        attempt: u32,
    },
    /// An attempt's outcome is unknown: its worker acknowledged it, then went
    /// silent, timed out or was lost. The step may have had its effect.
    StepUnknown {
        /// Step name.
        step: String,
        /// `execute` or `compensate`.
        kind: CommandKind,
        /// The attempt.
        attempt: u32,
        /// Why the outcome is unknown.
        reason: String,
    },
    /// A step's action failed for good.
    StepFailed {
        /// Step name.
        step: String,
        /// Why.
        error: String,
    },
    /// A step's compensation was sent.
    CompensationStarted {
        /// Step name.
        step: String,
        /// The parallel group the step belongs to, if any.
        group: Option<String>,
    },
    /// A step's compensation completed.
    Compensated {
        /// Step name.
        step: String,
    },
    /// A step's compensation failed for good.
    CompensationFailed {
        /// Step name.
        step: String,
        /// Why.
        error: String,
    },
    /// A step's (or compensation's) retries ran out: the run paused and
    /// waits for an operator.
    RunPaused {
        /// Step name.
        step: String,
        /// `execute` or `compensate`.
        kind: CommandKind,
        /// The last attempt's error.
        error: String,
    },
    /// An operator resumed a paused run, or rolled it back.
    Operator {
        /// `resume` or `rollback`.
        action: crate::ControlAction,
        /// Who.
        by: String,
    },
    /// An operator cancelled the run: its rollback starts.
    RunCancelled {
        /// Who.
        by: String,
        /// Why, if said.
        reason: Option<String>,
    },
    /// The run reached a terminal status.
    RunEnded {
        /// Its final report.
        report: Box<RunReport>,
    },
}

/// Coordinator → anyone: a run's lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEvent {
    /// The run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its flow.
    pub flow: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// What happened.
    pub event: EventKind,
}

impl Message for RunEvent {
    const KIND: &'static str = "run.event";
}

/// A flow's definition in the cluster's flow registry, one per version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRegistration {
    /// The definition.
    pub flow: crate::FlowDef,
    /// Its version (the definition's [`crate::FlowDef::version`]).
    pub version: Arc<str>,
    /// Unix ms of the first registration of this version: the newest
    /// version of a flow is the one registered last.
    pub registered_at_ms: u64,
    /// Who registered it first (a worker id, or `cli` for `orchestrix flows apply`).
    pub registered_by: String,
}

impl Message for FlowRegistration {
    const KIND: &'static str = "flow.registration";
}

/// What one worker serves, renewed while it lives (an entry that is not
/// renewed expires, and the worker counts as gone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPresence {
    /// The worker's id (as in its acks).
    pub worker: String,
    /// Host it runs on.
    #[serde(default)]
    pub host: String,
    /// Unix ms at which it started.
    pub started_at_ms: u64,
    /// What it serves.
    pub flows: Vec<ServedFlow>,
}

impl Message for WorkerPresence {
    const KIND: &'static str = "worker.presence";
}

/// Steps of one flow a worker serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedFlow {
    /// Flow name.
    pub flow: Arc<str>,
    /// The version served; `nil`: every version (a worker registered by step
    /// names only).
    pub version: Option<Arc<str>>,
    /// The steps it has an action handler for.
    pub steps: Vec<Arc<str>>,
}

/// Coordinator → workers (on the step's inquiry subject, which every replica
/// hears): the run was cancelled; whoever holds this command stops its
/// handler, and nobody starts it any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepCancel {
    /// The command to stop.
    #[serde(with = "crate::uuid_text")]
    pub command_id: Uuid,
    /// Its run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// Its attempt.
    pub attempt: u32,
}

impl Message for StepCancel {
    const KIND: &'static str = "step.cancel";
}

/// Operator → coordinators (every coordinator hears it; the one running the
/// run answers): act on a live run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlRequest {
    /// The run.
    #[serde(with = "crate::uuid_text")]
    pub run_id: Uuid,
    /// What to do.
    pub action: crate::ControlAction,
    /// Who asks.
    pub by: String,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Message for ControlRequest {
    const KIND: &'static str = "run.control";
}
