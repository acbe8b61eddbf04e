//! Metrics of runs and steps, as OpenTelemetry instruments fed by hooks.
//!
//! | instrument | kind | attributes |
//! | --- | --- | --- |
//! | `orchestrix.runs.started` | counter | `flow` |
//! | `orchestrix.runs.finished` | counter | `flow`, `status` (`completed`, `failed`, `compensation_failed`, `cancelled`) |
//! | `orchestrix.runs.in_flight` | up-down counter | `flow` |
//! | `orchestrix.run.duration` | histogram (s) | `flow`, `status` |
//! | `orchestrix.step.attempts` | counter | `flow`, `step`, `kind`, `outcome` (`completed`, `retried`, `failed`) |
//! | `orchestrix.step.duration` | histogram (s) | `flow`, `step`, `kind` (first attempt to outcome) |
//! | `orchestrix.runs.paused` | counter | `flow`, `step`, `kind`: runs that paused for an operator |
//! | `orchestrix.operator.actions` | counter | `flow`, `action` (`cancel`, `resume`, `rollback`) |
//!
//! The duration histograms are in seconds with the buckets of
//! [`DURATION_BUCKETS`] (1 ms to 10 min): the SDK's default boundaries
//! (0, 5, 10, 25, … 10000) are meant for milliseconds and would put every
//! step in the first bucket.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use orchestrix_proto::{CommandKind, RunReport};
use uuid::Uuid;

use crate::{Hooks, StepEvent};

/// Hooks that record the [module's](self) instruments on a meter. Register on
/// a coordinator: `Coordinator::builder().hooks(RunMetrics::new(&meter))`.
pub struct RunMetrics {
    started: Counter<u64>,
    finished: Counter<u64>,
    in_flight: UpDownCounter<i64>,
    run_duration: Histogram<f64>,
    attempts: Counter<u64>,
    step_duration: Histogram<f64>,
    paused: Counter<u64>,
    operator: Counter<u64>,
    /// Attribute sets built once per flow and step, so that recording
    /// allocates nothing: a run records about ten measurements.
    attrs: RwLock<HashMap<Box<str>, Arc<FlowAttrs>>>,
}

/// At most this many flows get cached attribute sets; any further flow
/// (names are bounded by what is registered, so only a misuse gets here)
/// has its attributes built per measurement.
const MAX_CACHED_FLOWS: usize = 1024;

/// The attribute sets of one flow.
struct FlowAttrs {
    flow: [KeyValue; 1],
    /// `flow` and `status`, one per run status name.
    ended: RwLock<Vec<(&'static str, [KeyValue; 2])>>,
    steps: RwLock<Vec<Arc<StepAttrs>>>,
}

/// The attribute sets of one step and kind.
struct StepAttrs {
    step: Box<str>,
    kind: CommandKind,
    /// `flow`, `step`, `kind`.
    base: [KeyValue; 3],
    /// `base` and `outcome`: completed, retried, failed.
    outcomes: [[KeyValue; 4]; 3],
}

const OUTCOMES: [&str; 3] = ["completed", "retried", "failed"];
const COMPLETED: usize = 0;
const RETRIED: usize = 1;
const FAILED: usize = 2;

impl FlowAttrs {
    fn new(flow: &str) -> Self {
        FlowAttrs {
            flow: [KeyValue::new("flow", Arc::<str>::from(flow))],
            ended: RwLock::default(),
            steps: RwLock::default(),
        }
    }

    fn step(&self, step: &str, kind: CommandKind) -> Arc<StepAttrs> {
        let find = |v: &Vec<Arc<StepAttrs>>| {
            v.iter().find(|s| s.kind == kind && *s.step == *step).cloned()
        };
        if let Some(s) = find(&self.steps.read().unwrap_or_else(|p| p.into_inner())) {
            return s;
        }
        let mut steps = self.steps.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = find(&steps) {
            return s;
        }
        let [flow] = self.flow.clone();
        let base = [
            flow,
            KeyValue::new("step", Arc::<str>::from(step)),
            KeyValue::new("kind", kind.as_str()),
        ];
        let outcomes = OUTCOMES.map(|o| {
            let [f, s, k] = base.clone();
            [f, s, k, KeyValue::new("outcome", o)]
        });
        let attrs = Arc::new(StepAttrs { step: step.into(), kind, base, outcomes });
        steps.push(attrs.clone());
        attrs
    }

    /// Records `f` with the `flow` and `status` attributes.
    fn with_ended(&self, status: &'static str, f: impl FnOnce(&[KeyValue])) {
        let find = |v: &Vec<(&'static str, [KeyValue; 2])>| {
            v.iter().find(|(s, _)| *s == status).map(|(_, a)| a.clone())
        };
        let cached = find(&self.ended.read().unwrap_or_else(|p| p.into_inner()));
        let attrs = cached.unwrap_or_else(|| {
            let [flow] = self.flow.clone();
            let attrs = [flow, KeyValue::new("status", status)];
            self.ended.write().unwrap_or_else(|p| p.into_inner()).push((status, attrs.clone()));
            attrs
        });
        f(&attrs);
    }
}

impl fmt::Debug for RunMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunMetrics")
    }
}

/// Upper bounds, in seconds, of the buckets of `orchestrix.run.duration` and
/// `orchestrix.step.duration`: 1 ms, 10 ms, 100 ms and 1 s each fall in a
/// bucket of their own, with finer steps in between, up to 10 minutes.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

impl RunMetrics {
    /// Instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        RunMetrics {
            started: meter
                .u64_counter("orchestrix.runs.started")
                .with_description("Runs started")
                .build(),
            finished: meter
                .u64_counter("orchestrix.runs.finished")
                .with_description("Runs ended, by status")
                .build(),
            in_flight: meter
                .i64_up_down_counter("orchestrix.runs.in_flight")
                .with_description("Runs live")
                .build(),
            run_duration: meter
                .f64_histogram("orchestrix.run.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_description("Run start to end")
                .build(),
            attempts: meter
                .u64_counter("orchestrix.step.attempts")
                .with_description("Step attempts, by outcome")
                .build(),
            step_duration: meter
                .f64_histogram("orchestrix.step.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_description("First attempt to final outcome of a step or compensation")
                .build(),
            paused: meter
                .u64_counter("orchestrix.runs.paused")
                .with_description("Runs paused for an operator when a step's retries ran out")
                .build(),
            operator: meter
                .u64_counter("orchestrix.operator.actions")
                .with_description("Operators' actions on runs")
                .build(),
            attrs: RwLock::default(),
        }
    }

    /// Instruments on the global meter provider (what
    /// `orchestrix_worker::telemetry::init` sets up).
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("orchestrix"))
    }

    /// The attribute sets of `flow`, cached.
    fn flow(&self, flow: &str) -> Arc<FlowAttrs> {
        if let Some(f) = self.attrs.read().unwrap_or_else(|p| p.into_inner()).get(flow) {
            return f.clone();
        }
        let mut attrs = self.attrs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = attrs.get(flow) {
            return f.clone();
        }
        let f = Arc::new(FlowAttrs::new(flow));
        if attrs.len() < MAX_CACHED_FLOWS {
            attrs.insert(flow.into(), f.clone());
        }
        f
    }

    fn step(&self, e: &StepEvent<'_>) -> Arc<StepAttrs> {
        self.flow(e.flow).step(e.step, e.kind)
    }

    fn attempt(&self, e: &StepEvent<'_>, outcome: usize) -> Arc<StepAttrs> {
        let step = self.step(e);
        self.attempts.add(1, &step.outcomes[outcome]);
        step
    }
}

impl Hooks for RunMetrics {
    fn on_run_start(&self, _run_id: Uuid, flow: &str) {
        let f = self.flow(flow);
        self.started.add(1, &f.flow);
        self.in_flight.add(1, &f.flow);
    }

    fn on_step_retry(&self, e: &StepEvent<'_>, _error: &str, _delay: Duration) {
        self.attempt(e, RETRIED);
    }

    fn on_step_success(&self, e: &StepEvent<'_>, d: Duration) {
        let step = self.attempt(e, COMPLETED);
        self.step_duration.record(d.as_secs_f64(), &step.base);
    }

    fn on_step_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, FAILED);
    }

    fn on_compensation_success(&self, e: &StepEvent<'_>, d: Duration) {
        debug_assert_eq!(e.kind, CommandKind::Compensate);
        let step = self.attempt(e, COMPLETED);
        self.step_duration.record(d.as_secs_f64(), &step.base);
    }

    fn on_compensation_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, FAILED);
    }

    fn on_run_paused(&self, e: &StepEvent<'_>, _error: &str) {
        self.paused.add(1, &self.step(e).base);
    }

    fn on_operator_action(
        &self,
        _run_id: Uuid,
        flow: &str,
        action: orchestrix_proto::ControlAction,
        _by: &str,
    ) {
        let attrs =
            [KeyValue::new("flow", flow.to_owned()), KeyValue::new("action", action.as_str())];
        self.operator.add(1, &attrs);
    }

    fn on_run_cancelled(&self, _run_id: Uuid, flow: &str, _by: &str, _reason: Option<&str>) {
        let attrs = [KeyValue::new("flow", flow.to_owned()), KeyValue::new("action", "cancel")];
        self.operator.add(1, &attrs);
    }

    fn on_run_end(&self, report: &RunReport) {
        let f = self.flow(&report.flow);
        self.in_flight.add(-1, &f.flow);
        f.with_ended(report.status.as_str(), |attrs| {
            self.finished.add(1, attrs);
            self.run_duration.record(report.duration.as_secs_f64(), attrs);
        });
    }
}
