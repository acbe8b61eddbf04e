use std::time::Duration;

use orchestrix_proto::{CommandKind, RunId, RunReport};
use uuid::Uuid;

/// Which run and step a hook call is about.
#[derive(Debug, Clone, Copy)]
pub struct StepEvent<'a> {
    /// The run.
    pub run_id: RunId,
    /// Flow name.
    pub flow: &'a str,
    /// Step name.
    pub step: &'a str,
    /// Execute or compensate.
    pub kind: CommandKind,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The parallel group the step belongs to, if any.
    pub group: Option<&'a str>,
}

/// Callbacks as runs progress, for logging and metrics.
///
/// Every method has an empty default, so implement only what you need. Hooks
/// are called on the run's actor, in order, after the transition they report
/// has been stored: keep them quick and hand slow work to a channel. A hook
/// that panics is logged and otherwise ignored; it cannot break the run.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use orchestrix_coordinator::{Hooks, StepEvent};
///
/// #[derive(Default)]
/// struct Retries(AtomicU32);
///
/// impl Hooks for Retries {
///     fn on_step_retry(&self, _e: &StepEvent<'_>, _error: &str, _delay: std::time::Duration) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
/// ```
#[allow(unused_variables)]
pub trait Hooks: Send + Sync + 'static {
    /// A run started.
    fn on_run_start(&self, run_id: Uuid, flow: &str) {}
    /// An attempt of a step's action is about to be sent.
    fn on_step_start(&self, event: &StepEvent<'_>) {}
    /// An attempt (of an action or a compensation) failed and another follows after `delay`.
    fn on_step_retry(&self, event: &StepEvent<'_>, error: &str, delay: std::time::Duration) {}
    /// A step's action completed.
    fn on_step_success(&self, event: &StepEvent<'_>, duration: Duration) {}
    /// An attempt's outcome is unknown: its worker started it, then went
    /// silent, timed out or was lost. The step may have had its effect; what
    /// follows (a retry, or the rollback with this step's compensation) is
    /// reported by the next hook.
    fn on_step_unknown(&self, event: &StepEvent<'_>, reason: &str) {}
    /// A step's action failed for good: the rollback starts.
    fn on_step_failure(&self, event: &StepEvent<'_>, error: &str) {}
    /// A step's compensation is about to be sent for the first time.
    fn on_compensation_start(&self, event: &StepEvent<'_>) {}
    /// A step's compensation completed.
    fn on_compensation_success(&self, event: &StepEvent<'_>, duration: Duration) {}
    /// A step's compensation failed for good: its side effect is left in place.
    fn on_compensation_failure(&self, event: &StepEvent<'_>, error: &str) {}
    /// The step's (or compensation's) retries ran out and the run paused,
    /// waiting for an operator.
    fn on_run_paused(&self, event: &StepEvent<'_>, error: &str) {}
    /// An operator resumed a paused run or rolled it back.
    fn on_operator_action(
        &self,
        run_id: Uuid,
        flow: &str,
        action: orchestrix_proto::ControlAction,
        by: &str,
    ) {
    }
    /// An operator cancelled the run: its rollback starts.
    fn on_run_cancelled(&self, run_id: Uuid, flow: &str, by: &str, reason: Option<&str>) {}
    /// The run reached a terminal status.
    fn on_run_end(&self, report: &RunReport) {}
}

/// Hooks shared behind an `Arc` are hooks too.
impl<H: Hooks + ?Sized> Hooks for std::sync::Arc<H> {
    fn on_run_start(&self, run_id: Uuid, flow: &str) {
        (**self).on_run_start(run_id, flow)
    }
    fn on_step_start(&self, event: &StepEvent<'_>) {
        (**self).on_step_start(event)
    }
    fn on_step_retry(&self, event: &StepEvent<'_>, error: &str, delay: Duration) {
        (**self).on_step_retry(event, error, delay)
    }
    fn on_step_success(&self, event: &StepEvent<'_>, duration: Duration) {
        (**self).on_step_success(event, duration)
    }
    fn on_step_unknown(&self, event: &StepEvent<'_>, reason: &str) {
        (**self).on_step_unknown(event, reason)
    }
    fn on_step_failure(&self, event: &StepEvent<'_>, error: &str) {
        (**self).on_step_failure(event, error)
    }
    fn on_compensation_start(&self, event: &StepEvent<'_>) {
        (**self).on_compensation_start(event)
    }
    fn on_compensation_success(&self, event: &StepEvent<'_>, duration: Duration) {
        (**self).on_compensation_success(event, duration)
    }
    fn on_compensation_failure(&self, event: &StepEvent<'_>, error: &str) {
        (**self).on_compensation_failure(event, error)
    }
    fn on_run_cancelled(&self, run_id: Uuid, flow: &str, by: &str, reason: Option<&str>) {
        (**self).on_run_cancelled(run_id, flow, by, reason)
    }
    fn on_run_paused(&self, event: &StepEvent<'_>, error: &str) {
        (**self).on_run_paused(event, error)
    }
    fn on_operator_action(
        &self,
        run_id: Uuid,
        flow: &str,
        action: orchestrix_proto::ControlAction,
        by: &str,
    ) {
        (**self).on_operator_action(run_id, flow, action, by)
    }
    fn on_run_end(&self, report: &RunReport) {
        (**self).on_run_end(report)
    }
}
