//! A flow's definition as pure data: steps, their policies, whether they
//! have a compensation, and the version they make. No code and no engine:
//! workers register it, coordinators run from it, flow files describe it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RetryPolicy;
use crate::time::opt_duration_ms;
use crate::{NameError, validate_name};

/// A step as the coordinator sees it: its name and policies, no code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[non_exhaustive]
pub struct StepDef {
    /// Step name, unique within its flow.
    pub name: Arc<str>,
    /// Retry policy of the step's action.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Time budget of each attempt.
    #[serde(with = "opt_duration_ms", default, rename = "timeoutMs")]
    pub timeout: Option<Duration>,
    /// Whether the step has a compensation to run on rollback.
    #[serde(default)]
    pub compensable: bool,
    /// Retry policy of the compensation.
    #[serde(default = "RetryPolicy::compensation_default")]
    pub compensation_retry: RetryPolicy,
    /// Time budget of each compensation attempt.
    #[serde(with = "opt_duration_ms", default, rename = "compensationTimeoutMs")]
    pub compensation_timeout: Option<Duration>,
    /// What an attempt with an unknown outcome means for this step.
    #[serde(default)]
    pub on_unknown: OnUnknown,
    /// What happens when the action's retries run out.
    #[serde(default, skip_serializing_if = "OnExhausted::is_default")]
    pub on_exhausted: OnExhausted,
    /// What happens when the compensation's retries run out.
    #[serde(default, skip_serializing_if = "OnExhausted::is_default")]
    pub compensation_on_exhausted: OnExhausted,
    /// How long a run paused at this step waits for an operator before it
    /// rolls back on its own (a paused compensation then counts as failed).
    /// `None`: until an operator acts.
    #[serde(
        with = "opt_duration_ms",
        default,
        rename = "pauseTimeoutMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub pause_timeout: Option<Duration>,
    /// The parallel group the step belongs to, if any: consecutive steps of
    /// one group run at the same time, and are compensated at the same time
    /// (see [`FlowDef::stages`]). Omitted from the encoding when `None`, so
    /// flows without groups keep their versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Arc<str>>,
    /// At most this many attempts of the step's action in flight at once,
    /// across every run and coordinator (a fragile dependency behind it);
    /// attempts beyond it wait for a slot, in arrival order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// What happens when a step's (or a compensation's) retries run out on
/// retryable errors: roll back, or pause for an operator (a dependency down
/// for an hour: fix it, then `orchestrix resume`, rather than roll back every
/// run). Permanent errors always roll back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// The step fails for good and the run rolls back (for a compensation:
    /// it counts as failed and the rollback goes on). The default.
    #[default]
    Rollback,
    /// The run pauses, durably, with the step, its attempts and last error
    /// visible; an operator resumes it (a fresh budget of attempts) or rolls
    /// it back.
    Pause,
}

impl OnExhausted {
    fn is_default(&self) -> bool {
        *self == OnExhausted::Rollback
    }
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
            on_exhausted: OnExhausted::Rollback,
            compensation_on_exhausted: OnExhausted::Rollback,
            pause_timeout: None,
            group: None,
            max_in_flight: None,
        }
    }

    /// Sets the action's retry policy.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the time one attempt of the action may take.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Gives the step a compensation (served by the workers that serve it).
    #[must_use]
    pub fn compensable(mut self) -> Self {
        self.compensable = true;
        self
    }

    /// Sets the compensation's retry policy.
    #[must_use]
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Sets the time one attempt of the compensation may take.
    #[must_use]
    pub fn compensation_timeout(mut self, timeout: Duration) -> Self {
        self.compensation_timeout = Some(timeout);
        self
    }

    /// Sets what an unknown outcome of the action means.
    #[must_use]
    pub fn on_unknown(mut self, on_unknown: OnUnknown) -> Self {
        self.on_unknown = on_unknown;
        self
    }

    /// Sets what happens when the action's retries run out.
    #[must_use]
    pub fn on_exhausted(mut self, on_exhausted: OnExhausted) -> Self {
        self.on_exhausted = on_exhausted;
        self
    }

    /// Sets what happens when the compensation's retries run out.
    #[must_use]
    pub fn compensation_on_exhausted(mut self, on_exhausted: OnExhausted) -> Self {
        self.compensation_on_exhausted = on_exhausted;
        self
    }

    /// Sets how long a paused step waits for an operator before it rolls back.
    #[must_use]
    pub fn pause_timeout(mut self, timeout: Duration) -> Self {
        self.pause_timeout = Some(timeout);
        self
    }

    /// Puts the step in a parallel group (consecutive steps of one group run
    /// at once).
    #[must_use]
    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(Arc::from(group));
        self
    }

    /// Sets how many attempts of this step may be in flight at once, across
    /// all runs.
    #[must_use]
    pub fn max_in_flight(mut self, limit: u32) -> Self {
        self.max_in_flight = Some(limit);
        self
    }
}

/// A flow as the coordinator sees it: a name, its steps in order and their
/// policies. Pure data: workers register it in the cluster's flow registry,
/// and coordinators run from it while the handlers live in the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[non_exhaustive]
pub struct FlowDef {
    /// Flow name.
    pub name: Arc<str>,
    /// An explicit version label; without one the version is a hash of the
    /// definition (see [`FlowDef::version`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Arc<str>>,
    /// Steps, run in this order.
    pub steps: Vec<StepDef>,
    /// Runs with the same concurrency key that may run at once (the others
    /// queue); `None`: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_per_key: Option<u32>,
    /// A JSON Schema (as JSON text) that every run's input must match,
    /// checked before a run is created; `None`: any input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Arc<str>>,
}

impl FlowDef {
    /// A flow with no steps yet.
    pub fn new(name: &str) -> Self {
        FlowDef {
            name: Arc::from(name),
            version: None,
            steps: Vec::new(),
            concurrency_per_key: None,
            input_schema: None,
        }
    }

    /// Adds a step at the end.
    ///
    /// ```
    /// use std::time::Duration;
    /// use orchestrix_proto::{FlowDef, OnUnknown, RetryPolicy, StepDef};
    /// let flow = FlowDef::new("payment-flow")
    ///     .step(StepDef::new("reserve-stock").compensable())
    ///     .step(
    ///         StepDef::new("process-payment")
    ///             .retry(RetryPolicy::new().retries(3).retry_delay(Duration::from_secs(1)))
    ///             .timeout(Duration::from_secs(5)),
    ///     )
    ///     .step(StepDef::new("send-email").on_unknown(OnUnknown::Retry));
    /// assert!(flow.validate().is_ok());
    /// assert_eq!(flow.steps[1].retry.retries, 3);
    /// ```
    #[must_use]
    pub fn step(mut self, step: StepDef) -> Self {
        self.steps.push(step);
        self
    }

    /// Gives the flow an explicit version label instead of the hash (what
    /// `Flow::version` sets; [`FlowDef::version`] reads it).
    #[must_use]
    pub fn with_version(mut self, label: &str) -> Self {
        self.version = Some(Arc::from(label));
        self
    }

    /// Sets how many runs with one concurrency key may run at once.
    #[must_use]
    pub fn concurrency_per_key(mut self, limit: u32) -> Self {
        self.concurrency_per_key = Some(limit);
        self
    }

    /// Sets the JSON Schema (JSON text) run inputs must match.
    #[must_use]
    pub fn input_schema(mut self, schema: &str) -> Self {
        self.input_schema = Some(Arc::from(schema));
        self
    }

    /// The flow's version: its explicit label, or else 16 hex digits hashed
    /// from the definition, so that any change to a step, its order or a
    /// policy makes another version and the same definition, built in any
    /// process, makes the same one.
    ///
    /// ```
    /// use orchestrix_proto::{FlowDef, StepDef};
    /// let mut a = FlowDef::new("payment-flow");
    /// a.steps.push(StepDef::new("charge"));
    /// let mut b = a.clone();
    /// assert_eq!(a.version(), b.version());
    /// b.steps[0].compensable = true;
    /// assert_ne!(a.version(), b.version());
    /// ```
    pub fn version(&self) -> Arc<str> {
        if let Some(label) = &self.version {
            return label.clone();
        }
        Arc::from(format!("{:016x}", self.digest()))
    }

    /// FNV-1a over the definition's MessagePack encoding (with field names):
    /// stable across processes, platforms and Rust releases.
    fn digest(&self) -> u64 {
        let bytes = rmp_serde::to_vec_named(self).unwrap_or_default();
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// The flow's stages, in order: each a range of step indexes that run
    /// together. A step outside any group is a stage of its own; the
    /// consecutive steps of a parallel group are one stage. A stage starts
    /// when the one before it completed; rollback goes stage by stage in
    /// reverse, the members of one stage compensated at the same time.
    pub fn stages(&self) -> Vec<std::ops::Range<usize>> {
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            match out.last_mut() {
                Some(last)
                    if step.group.is_some() && self.steps[last.start].group == step.group =>
                {
                    last.end = i + 1
                }
                _ => out.push(i..i + 1),
            }
        }
        out
    }

    /// The stage (see [`FlowDef::stages`]) step `step` belongs to.
    pub fn stage_of(&self, step: usize) -> std::ops::Range<usize> {
        let group = self.steps.get(step).and_then(|s| s.group.as_ref());
        let Some(group) = group else { return step..step + 1 };
        let same = |i: &usize| self.steps[*i].group.as_ref() == Some(group);
        let start = (0..step).rev().take_while(|i| same(i)).last().unwrap_or(step);
        let end = (step..self.steps.len()).take_while(|i| same(i)).last().map_or(step, |e| e) + 1;
        start..end
    }

    /// The index of the step named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| &*s.name == name)
    }

    /// Checks the names (usable as NATS subject tokens) and that step names are unique.
    pub fn validate(&self) -> Result<(), FlowError> {
        validate_name("flow", &self.name)?;
        if let Some(label) = &self.version {
            validate_name("version", label)?;
        }
        if self.steps.is_empty() {
            return Err(FlowError::NoSteps { flow: self.name.to_string() });
        }
        if self.concurrency_per_key == Some(0) {
            return Err(FlowError::Invalid {
                flow: self.name.to_string(),
                reason: "the concurrency limit per key must be at least 1".into(),
            });
        }
        for (i, step) in self.steps.iter().enumerate() {
            validate_name("step", &step.name)?;
            for (what, p) in [("", &step.retry), ("compensation ", &step.compensation_retry)] {
                let bad = if !(p.backoff.is_finite() && p.backoff >= 1.0) {
                    Some(format!("{what}backoff must be a number of at least 1, not {}", p.backoff))
                } else if !(0.0..=1.0).contains(&p.jitter) {
                    Some(format!("{what}jitter must be between 0 and 1, not {}", p.jitter))
                } else {
                    None
                };
                if let Some(reason) = bad {
                    return Err(FlowError::Policy {
                        flow: self.name.to_string(),
                        step: step.name.to_string(),
                        reason,
                    });
                }
            }
            let durations = [
                ("timeout", step.timeout),
                ("compensation timeout", step.compensation_timeout),
                ("pause timeout", step.pause_timeout),
                ("max duration", step.retry.max_duration),
                ("compensation max duration", step.compensation_retry.max_duration),
            ];
            let zero = durations.into_iter().find(|(_, d)| *d == Some(Duration::ZERO));
            let delays = [
                ("retry delay", Some(step.retry.retry_delay)),
                ("max delay", Some(step.retry.max_delay)),
                ("compensation retry delay", Some(step.compensation_retry.retry_delay)),
                ("compensation max delay", Some(step.compensation_retry.max_delay)),
            ];
            let too_long = durations
                .into_iter()
                .chain(delays)
                .find(|(_, d)| d.is_some_and(|d| d > crate::time::MAX_DURATION));
            let too_many =
                [("retries", &step.retry), ("compensation retries", &step.compensation_retry)]
                    .into_iter()
                    .find(|(_, p)| p.retries > RetryPolicy::MAX_RETRIES);
            let slow_start = [("", &step.retry), ("compensation ", &step.compensation_retry)]
                .into_iter()
                .find(|(_, p)| p.retry_delay > p.max_delay);
            let bad = if let Some((what, _)) = zero {
                Some(format!("a {what} of 0 is no time at all; leave it out for none"))
            } else if let Some((what, d)) = too_long {
                Some(format!(
                    "a {what} of {:?} is over the longest allowed, 100 years",
                    d.unwrap_or_default()
                ))
            } else if let Some((what, _)) = too_many {
                Some(format!("{what} are at most {}", RetryPolicy::MAX_RETRIES))
            } else {
                slow_start.map(|(what, p)| {
                    format!(
                        "the {what}retry delay ({:?}) is over the max delay ({:?})",
                        p.retry_delay, p.max_delay
                    )
                })
            };
            if let Some(reason) = bad {
                return Err(FlowError::Policy {
                    flow: self.name.to_string(),
                    step: step.name.to_string(),
                    reason,
                });
            }
            if step.max_in_flight == Some(0) {
                return Err(FlowError::Policy {
                    flow: self.name.to_string(),
                    step: step.name.to_string(),
                    reason: "max_in_flight must be at least 1".into(),
                });
            }
            if let Some(group) = &step.group {
                let policy = |reason: String| FlowError::Policy {
                    flow: self.name.to_string(),
                    step: step.name.to_string(),
                    reason,
                };
                validate_name("group", group).map_err(|e| policy(e.to_string()))?;
                // A group is one block: the same name further on would be
                // a second group that reads as the first.
                let split = i > 0
                    && self.steps[i - 1].group.as_ref() != Some(group)
                    && self.steps[..i].iter().any(|s| s.group.as_ref() == Some(group));
                if split {
                    return Err(policy(format!(
                        "the steps of parallel group `{group}` must be next to each other"
                    )));
                }
                // One pause at a time per run: a member cannot pause while
                // its siblings go on.
                if step.on_exhausted == OnExhausted::Pause
                    || step.compensation_on_exhausted == OnExhausted::Pause
                {
                    return Err(policy(format!(
                        "a step of parallel group `{group}` cannot pause when its retries run out (it rolls back)"
                    )));
                }
            }
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
    /// A step's policy makes no sense.
    #[error("flow `{flow}`, step `{step}`: {reason}")]
    Policy {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// The flow as a whole is not valid (a limit of 0, an empty group).
    #[error("flow `{flow}`: {reason}")]
    Invalid {
        /// The flow.
        flow: String,
        /// What is wrong.
        reason: String,
    },
    /// A flow needs at least one step.
    #[error("flow `{flow}` has no steps")]
    NoSteps {
        /// The flow.
        flow: String,
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
