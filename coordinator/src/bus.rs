//! How step commands reach handlers and how their answers come back.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix::{Message, Recipient};
use futures::future::BoxFuture;
use orchestrix_proto::{
    Ack, Heartbeat, OutcomeResult, StepCommand, StepFailure, StepOutcome, WireError,
};
use orchestrix_worker::{StepHandlers, run_command};

/// An answer about a command, delivered to the run that sent it.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum BusReply {
    /// A worker took the command.
    Ack(Ack),
    /// A worker is still working on the command.
    Heartbeat(Heartbeat),
    /// The attempt ended.
    Outcome(StepOutcome),
    /// A worker refused the command without running it.
    Rejected(WireError),
    /// The command never left: publishing it failed.
    DispatchFailed {
        /// The command.
        command_id: uuid::Uuid,
        /// Why.
        message: String,
    },
    /// An inquiry about the command has reached the server (see
    /// [`Bus::confirms_inquiries`]): the window for answers opens now.
    Reached {
        /// The command asked about.
        command_id: uuid::Uuid,
    },
}

/// Where a bus delivers the answers about one command: the run's actor (any
/// actor that takes [`BusReply`], so the bus knows nothing of the engine).
#[derive(Clone)]
pub struct ReplyTo(Recipient<BusReply>);

impl ReplyTo {
    /// Answers go to `to`.
    pub fn new(to: impl Into<Recipient<BusReply>>) -> Self {
        ReplyTo(to.into())
    }

    /// Hands `reply` to the run. A run that already ended drops it.
    pub fn deliver(&self, reply: BusReply) {
        self.0.do_send(reply);
    }

    /// Whether the run is still there to be told anything.
    pub fn is_connected(&self) -> bool {
        self.0.connected()
    }
}

impl fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyTo")
    }
}

/// A command could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The transport is down or refused the command for now: worth another attempt.
    #[error("cannot send the step command: {0}")]
    Unavailable(String),
    /// The command can never be sent (e.g. larger than the transport allows).
    #[error("step command refused: {0}")]
    Rejected(String),
}

impl BusError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Unavailable(_))
    }
}

/// How the engine knows a command is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Liveness {
    /// Handlers run in this process and always answer (their time budget is
    /// enforced where they run): the engine needs no timers.
    Local,
    /// Handlers run elsewhere: an attempt is lost when no worker acknowledges
    /// it within `ack_timeout`, when its worker sends no heartbeat for
    /// `heartbeat_timeout`, or when no outcome arrives by the step's timeout
    /// plus `timeout_grace` (the worker enforces the timeout itself and
    /// reports it; this is the backstop for a worker that died).
    Remote {
        /// Time for some worker to acknowledge a command.
        ack_timeout: Duration,
        /// Longest silence of a worker with a command in hand.
        heartbeat_timeout: Duration,
        /// Added to a step's timeout before the coordinator gives up on it.
        timeout_grace: Duration,
        /// How far apart the hosts' clocks may be: a command's start-by time
        /// is `ack_timeout` after it is sent, and it is sent again elsewhere
        /// only once this much more has passed.
        clock_skew: Duration,
        /// How long an attempt may wait for some worker to take it before the
        /// step fails.
        worker_wait: Duration,
    },
}

/// How a command was handed over.
#[non_exhaustive]
pub enum Dispatched {
    /// Sent away: answers come through the [`ReplyTo`].
    Sent,
    /// Runs in this process: the run's actor polls the future, which resolves
    /// to the outcome. Saves a task and a message per step.
    Local(BoxFuture<'static, OutcomeResult>),
}

impl fmt::Debug for Dispatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dispatched::Sent => "Dispatched::Sent",
            Dispatched::Local(_) => "Dispatched::Local",
        })
    }
}

/// Carries step commands to handlers, and their answers back.
///
/// The saga logic only talks to this trait, so it runs unchanged in-process
/// ([`MemoryBus`]) and over NATS.
pub trait Bus: Send + Sync + 'static {
    /// Sends `cmd`; every answer about it goes to `reply`, unless the command
    /// runs locally ([`Dispatched::Local`]). When the run is traced, the
    /// attempt's OpenTelemetry context is current during the call
    /// (`opentelemetry::Context::current()`): a bus carries it along with the
    /// command.
    fn dispatch(&self, cmd: StepCommand, reply: &ReplyTo) -> Result<Dispatched, BusError>;

    /// Asks every worker of `cmd`'s step whether one holds it (after a
    /// takeover): the holder answers to `reply`; the others stay silent and
    /// run nothing.
    fn inquire(&self, cmd: StepCommand, reply: &ReplyTo) -> Result<(), BusError> {
        let _ = (cmd, reply);
        Err(BusError::Unavailable("this bus cannot ask workers about a command".into()))
    }

    /// Whether this bus delivers [`BusReply::Reached`] once each inquiry has
    /// reached its server. Silence is taken for "nobody holds it" only
    /// within a window opened then: a coordinator cut off from its server
    /// (its node frozen) would otherwise conclude from the silence of a
    /// connection that carried nothing, and send again a command a worker
    /// runs.
    fn confirms_inquiries(&self) -> bool {
        false
    }

    /// Tells whoever holds `cmd` to stop it, and everyone not to start it
    /// (the run was cancelled). In-process handlers are dropped by the run's
    /// actor itself.
    fn cancel(&self, cmd: &StepCommand) -> Result<(), BusError> {
        let _ = cmd;
        Ok(())
    }

    /// What the engine must watch to notice a lost command.
    fn liveness(&self) -> Liveness {
        Liveness::Local
    }

    /// Outcomes that arrived for runs not live here (they ended, or were
    /// never here): taken once, by the coordinator, which notes them in the
    /// runs' history as late answers.
    fn take_unrouted(&self) -> Option<tokio::sync::mpsc::Receiver<StepOutcome>> {
        None
    }

    /// The run ended: no more answers about it are expected.
    fn run_finished(&self, run_id: uuid::Uuid) {
        let _ = run_id;
    }
}

/// The embedded bus: handlers registered in this process, polled by the run's
/// own actor on its thread.
#[derive(Default)]
pub struct MemoryBus {
    flows: HashMap<Arc<str>, Vec<StepHandlers>>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus").field("flows", &self.flows.keys().collect::<Vec<_>>()).finish()
    }
}

impl MemoryBus {
    /// A bus with no handlers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the handlers of a flow's steps, in step order.
    pub fn register(&mut self, flow: &str, handlers: Vec<StepHandlers>) {
        self.flows.insert(Arc::from(flow), handlers);
    }

    /// The handlers registered for `flow`.
    pub fn handlers(&self, flow: &str) -> Option<&[StepHandlers]> {
        self.flows.get(flow).map(Vec::as_slice)
    }
}

impl Bus for MemoryBus {
    fn dispatch(&self, cmd: StepCommand, _reply: &ReplyTo) -> Result<Dispatched, BusError> {
        let handler = self
            .flows
            .get(&cmd.flow)
            .and_then(|steps| steps.get(cmd.step_index as usize))
            .and_then(|h| h.get(cmd.kind));
        let Some(handler) = handler else {
            let failure = StepFailure::new(
                format!(
                    "no {} handler for step `{}` of flow `{}`",
                    cmd.kind.as_str(),
                    cmd.step,
                    cmd.flow
                ),
                false,
            );
            return Ok(Dispatched::Local(Box::pin(futures::future::ready(OutcomeResult::Failed(
                failure,
            )))));
        };
        Ok(Dispatched::Local(run_command(handler, cmd)))
    }
}
