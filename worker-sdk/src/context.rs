use std::fmt;
use std::sync::Arc;

use orchestrix_proto::{CommandId, CommandKind, RunId, StepOutput};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::StepError;

/// What a step handler (or its compensation) gets: the run's typed input and
/// where it stands.
pub struct StepContext<I> {
    /// The run's input, as given to `run`.
    pub input: I,
    pub(crate) run_id: Uuid,
    pub(crate) command_id: Uuid,
    pub(crate) flow: Arc<str>,
    pub(crate) step: Arc<str>,
    pub(crate) attempt: u32,
    pub(crate) kind: CommandKind,
    pub(crate) outputs: Vec<StepOutput>,
    pub(crate) cancel: crate::handler::Cancel,
}

impl<I> StepContext<I> {
    /// The run's id: stable across attempts, a good base for idempotency keys
    /// towards the services a step calls.
    pub fn run_id(&self) -> RunId {
        self.run_id.into()
    }

    /// Id of the command this attempt runs for: unique per attempt, the same
    /// when a command is delivered again. Useful in logs and ledgers.
    pub fn command_id(&self) -> CommandId {
        self.command_id.into()
    }

    /// Name of the flow.
    pub fn flow(&self) -> &str {
        &self.flow
    }

    /// Name of the step.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// Attempt number of this handler for this step, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// True when this is the step's compensation rather than its action.
    pub fn is_compensation(&self) -> bool {
        self.kind == CommandKind::Compensate
    }

    /// The output of an earlier completed step (a compensation also sees its
    /// own step's output), decoded as `T`.
    ///
    /// A missing output or one that does not decode as `T` is a permanent error:
    /// retrying would not change it.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let out = self.outputs.iter().find(|o| &*o.step == step).ok_or_else(|| {
            StepError::permanent(format!("no output of step `{step}` is available"))
        })?;
        out.output.decode().map_err(|e| {
            StepError::permanent(format!("output of step `{step}` does not decode: {e}"))
        })
    }

    /// Fires when the attempt is over before the handler returned: its
    /// deadline passed or the run no longer wants it (cancelled), and the
    /// handler's future is dropped. It never fires once the handler has
    /// returned. A handler that must clean up (release a lock, abort an
    /// upload) clones it into a task of its own:
    ///
    /// ```
    /// # use orchestrix_worker::StepContext;
    /// # fn f(ctx: &StepContext<()>) {
    /// let stop = ctx.cancellation();
    /// tokio::spawn(async move {
    ///     stop.cancelled().await;
    ///     // give back what the attempt held
    /// });
    /// # }
    /// ```
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.token()
    }

    /// True once the attempt has been cancelled (see [`StepContext::cancellation`]).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Names of the steps whose outputs are available.
    pub fn completed_steps(&self) -> impl Iterator<Item = &str> {
        self.outputs.iter().map(|o| &*o.step)
    }
}

impl<I: fmt::Debug> fmt::Debug for StepContext<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepContext")
            .field("run_id", &self.run_id)
            .field("flow", &self.flow)
            .field("step", &self.step)
            .field("attempt", &self.attempt)
            .field("kind", &self.kind)
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}
