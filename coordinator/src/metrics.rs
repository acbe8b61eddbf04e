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

use std::fmt;
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
        }
    }

    /// Instruments on the global meter provider (what
    /// `orchestrix_worker::telemetry::init` sets up).
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("orchestrix"))
    }

    fn attempt(&self, e: &StepEvent<'_>, outcome: &'static str) {
        let attrs = [
            KeyValue::new("flow", e.flow.to_owned()),
            KeyValue::new("step", e.step.to_owned()),
            KeyValue::new("kind", e.kind.as_str()),
            KeyValue::new("outcome", outcome),
        ];
        self.attempts.add(1, &attrs);
    }

    fn step_done(&self, e: &StepEvent<'_>, d: Duration) {
        let attrs = [
            KeyValue::new("flow", e.flow.to_owned()),
            KeyValue::new("step", e.step.to_owned()),
            KeyValue::new("kind", e.kind.as_str()),
        ];
        self.step_duration.record(d.as_secs_f64(), &attrs);
    }
}

impl Hooks for RunMetrics {
    fn on_run_start(&self, _run_id: Uuid, flow: &str) {
        let attrs = [KeyValue::new("flow", flow.to_owned())];
        self.started.add(1, &attrs);
        self.in_flight.add(1, &attrs);
    }

    fn on_step_retry(&self, e: &StepEvent<'_>, _error: &str, _delay: Duration) {
        self.attempt(e, "retried");
    }

    fn on_step_success(&self, e: &StepEvent<'_>, d: Duration) {
        self.attempt(e, "completed");
        self.step_done(e, d);
    }

    fn on_step_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, "failed");
    }

    fn on_compensation_success(&self, e: &StepEvent<'_>, d: Duration) {
        debug_assert_eq!(e.kind, CommandKind::Compensate);
        self.attempt(e, "completed");
        self.step_done(e, d);
    }

    fn on_compensation_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, "failed");
    }

    fn on_run_paused(&self, e: &StepEvent<'_>, _error: &str) {
        let attrs = [
            KeyValue::new("flow", e.flow.to_owned()),
            KeyValue::new("step", e.step.to_owned()),
            KeyValue::new("kind", e.kind.as_str()),
        ];
        self.paused.add(1, &attrs);
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
        let flow = KeyValue::new("flow", report.flow.clone());
        self.in_flight.add(-1, std::slice::from_ref(&flow));
        let attrs = [flow, KeyValue::new("status", report.status.as_str())];
        self.finished.add(1, &attrs);
        self.run_duration.record(report.duration.as_secs_f64(), &attrs);
    }
}
