//! A flow's definition as pure data: steps, their policies, whether they
//! have a compensation. No code and no engine: the run record, the flow file
//! and the machine read it, and [`crate::Flow`] (with handlers) builds it.

use std::sync::Arc;
use std::time::Duration;

use orchestrix_proto::time::opt_duration_ms;
use orchestrix_proto::{NameError, validate_name};
use serde::{Deserialize, Serialize};

use crate::RetryPolicy;

/// A step as the coordinator sees it: its name and policies, no code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StepDef {
    /// Step name, unique within its flow.
    pub name: Arc<str>,
    /// Retry policy of the step's action.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Time budget of each attempt.
    #[serde(with = "opt_duration_ms", default, rename = "timeout_ms")]
    pub timeout: Option<Duration>,
    /// Whether the step has a compensation to run on rollback.
    #[serde(default)]
    pub compensable: bool,
    /// Retry policy of the compensation.
    #[serde(default = "RetryPolicy::compensation_default")]
    pub compensation_retry: RetryPolicy,
    /// Time budget of each compensation attempt.
    #[serde(with = "opt_duration_ms", default, rename = "compensation_timeout_ms")]
    pub compensation_timeout: Option<Duration>,
    /// What an attempt with an unknown outcome means for this step.
    #[serde(default)]
    pub on_unknown: OnUnknown,
}

/// What an attempt with an **unknown outcome** means for a step: its worker
/// acknowledged the command (so the handler started), then went silent, timed
/// out or was lost, and the step may or may not have had its effect.
///
/// Compensations are always retried on an unknown outcome: a compensation
/// must be idempotent (safe to run twice, and safe to run for an action that
/// never happened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// The step may have happened: do not run it again. The run fails, and the
    /// rollback runs this step's compensation too (if it has one). The default:
    /// a charge is never made twice, and never left without its refund.
    #[default]
    MaybeDone,
    /// The step is idempotent: run it again, as a failed attempt under the
    /// step's retry policy. When the retries run out the step still counts as
    /// maybe done.
    Retry,
}

impl StepDef {
    /// A step with default policies and no compensation.
    pub fn new(name: &str) -> Self {
        StepDef {
            name: Arc::from(name),
            retry: RetryPolicy::default(),
            timeout: None,
            compensable: false,
            compensation_retry: RetryPolicy::compensation_default(),
            compensation_timeout: None,
            on_unknown: OnUnknown::MaybeDone,
        }
    }
}

/// A flow as the coordinator sees it: a name and its steps in order. Pure data:
/// the distributed coordinator reads it from a flow file, while the handlers
/// live in worker processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FlowDef {
    /// Flow name.
    pub name: Arc<str>,
    /// Steps, run in this order.
    pub steps: Vec<StepDef>,
}

impl FlowDef {
    /// A flow with no steps yet.
    pub fn new(name: &str) -> Self {
        FlowDef { name: Arc::from(name), steps: Vec::new() }
    }

    /// Checks the names (usable as NATS subject tokens) and that step names are unique.
    pub fn validate(&self) -> Result<(), FlowError> {
        validate_name("flow", &self.name)?;
        for (i, step) in self.steps.iter().enumerate() {
            validate_name("step", &step.name)?;
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(FlowError::DuplicateStep {
                    flow: self.name.to_string(),
                    step: step.name.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A flow definition that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// A flow or step name is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Two steps share a name.
    #[error("flow `{flow}` has two steps named `{step}`")]
    DuplicateStep {
        /// The flow.
        flow: String,
        /// The repeated step name.
        step: String,
    },
    /// A step's handlers do not match the definition.
    #[error("flow `{flow}`: {reason}")]
    Handlers {
        /// The flow.
        flow: String,
        /// What does not match.
        reason: String,
    },
}
