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
//! Past 10,000 flows (a misuse: flows are what is registered), counts go to
//! one series with the attribute `otel.metric.overflow=true`.
//!
//! The duration histograms are in seconds with the buckets of
//! [`DURATION_BUCKETS`] (1 ms to 10 min): the SDK's default boundaries
//! (0, 5, 10, 25, … 10000) are meant for milliseconds and would put every
//! step in the first bucket.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, ObservableCounter, ObservableUpDownCounter,
};
use orchestrix_proto::{CommandKind, RunReport};
use uuid::Uuid;

use crate::{Hooks, StepEvent};

/// Hooks that record the [module's](self) instruments on a meter. Register on
/// a coordinator: `Coordinator::builder().hooks(RunMetrics::new(&meter))`.
///
/// The counters are counted in atomics of our own and read by observable
/// instruments when the meter collects: a run's seven counts then cost seven
/// atomic additions, where the SDK's synchronous counters hash each
/// measurement's attribute set to find its series. Only the two duration
/// histograms (which have no observable form) and the rare operator actions
/// record through the SDK on the hot path.
pub struct RunMetrics {
    run_duration: Histogram<f64>,
    step_duration: Histogram<f64>,
    operator: Counter<u64>,
    flows: Arc<Flows>,
    /// Kept with the hooks: their callbacks read `flows`.
    _observed: ([ObservableCounter<u64>; 4], ObservableUpDownCounter<i64>),
}

/// At most this many flows get series of their own; the counts of any
/// further flow (names are bounded by what is registered, so only a misuse
/// gets here) go to one overflow series, `otel.metric.overflow=true`, as
/// the SDK does past its own cardinality limit.
const MAX_FLOWS: usize = 10_000;

/// Where a callback puts one observation: a count and its attributes.
type Put<'a> = &'a mut dyn FnMut(u64, &[KeyValue]);

/// Every flow's counts, and the overflow's.
struct Flows {
    /// Looked up on every hook call: hashed with foldhash, which is cheaper
    /// than the standard SipHash on short keys (SipHash was most of the
    /// lookup in profiles). Names are registered flows, bounded by
    /// `MAX_FLOWS`, and the hasher is seeded at random.
    by_name: RwLock<HashMap<Box<str>, Arc<FlowAttrs>, foldhash::fast::RandomState>>,
    overflow: Arc<FlowAttrs>,
}

impl Flows {
    /// Calls `f` on every flow that has counted something.
    fn each(&self, mut f: impl FnMut(&FlowAttrs)) {
        for flow in self.by_name.read().unwrap_or_else(|p| p.into_inner()).values() {
            f(flow);
        }
        f(&self.overflow);
    }
}

/// The attribute sets and counts of one flow.
struct FlowAttrs {
    flow: [KeyValue; 1],
    started: AtomicU64,
    in_flight: AtomicI64,
    /// One per run status seen.
    ended: RwLock<Vec<Arc<Ended>>>,
    steps: RwLock<Vec<Arc<StepAttrs>>>,
}

/// Runs of one flow ended with one status.
struct Ended {
    status: &'static str,
    /// `flow` and `status`.
    attrs: [KeyValue; 2],
    count: AtomicU64,
    /// `orchestrix.run.duration` with `attrs`.
    duration: Bound,
}

/// The attribute sets and counts of one step and kind.
struct StepAttrs {
    step: Box<str>,
    kind: CommandKind,
    /// `flow`, `step`, `kind`.
    base: [KeyValue; 3],
    /// `base` and `outcome`: completed, retried, failed.
    outcomes: [[KeyValue; 4]; 3],
    /// Attempts by outcome, in the order of `outcomes`.
    attempts: [AtomicU64; 3],
    paused: AtomicU64,
    /// `orchestrix.step.duration` with `base`.
    duration: Bound,
}

/// A duration histogram with one attribute set. With the SDK built in
/// (`otlp`), bound to it once: a record then costs no lookup of the set
/// (hashing its attributes, several hundred instructions a record) — the
/// SDK's bound instruments, experimental in 0.33.
#[cfg(feature = "otlp")]
struct Bound(opentelemetry::metrics::BoundHistogram<f64>);

#[cfg(not(feature = "otlp"))]
struct Bound(Histogram<f64>, Vec<KeyValue>);

impl Bound {
    #[cfg(feature = "otlp")]
    fn new(histogram: &Histogram<f64>, attrs: &[KeyValue]) -> Self {
        Bound(histogram.bind(attrs))
    }

    #[cfg(not(feature = "otlp"))]
    fn new(histogram: &Histogram<f64>, attrs: &[KeyValue]) -> Self {
        Bound(histogram.clone(), attrs.to_vec())
    }

    fn record(&self, d: Duration) {
        #[cfg(feature = "otlp")]
        self.0.record(d.as_secs_f64());
        #[cfg(not(feature = "otlp"))]
        self.0.record(d.as_secs_f64(), &self.1);
    }
}

const OUTCOMES: [&str; 3] = ["completed", "retried", "failed"];
const COMPLETED: usize = 0;
const RETRIED: usize = 1;
const FAILED: usize = 2;

impl FlowAttrs {
    fn new(flow: KeyValue) -> Self {
        FlowAttrs {
            flow: [flow],
            started: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            ended: RwLock::default(),
            steps: RwLock::default(),
        }
    }

    fn step(&self, step: &str, kind: CommandKind, duration: &Histogram<f64>) -> Arc<StepAttrs> {
        found_or_added(
            &self.steps,
            |s| s.kind == kind && *s.step == *step,
            || {
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
                StepAttrs {
                    step: step.into(),
                    kind,
                    duration: Bound::new(duration, &base),
                    base,
                    outcomes,
                    attempts: Default::default(),
                    paused: AtomicU64::new(0),
                }
            },
        )
    }

    /// The runs of this flow that ended with `status`.
    fn ended(&self, status: &'static str, duration: &Histogram<f64>) -> Arc<Ended> {
        found_or_added(
            &self.ended,
            |e| e.status == status,
            || {
                let [flow] = self.flow.clone();
                let attrs = [flow, KeyValue::new("status", status)];
                let duration = Bound::new(duration, &attrs);
                Ended { status, attrs, count: AtomicU64::new(0), duration }
            },
        )
    }
}

/// The entry of `list` that `is` picks, added (made by `make`) if there is
/// none: found under the read lock, as it nearly always is; the write lock
/// only to add one.
fn found_or_added<T>(
    list: &RwLock<Vec<Arc<T>>>,
    is: impl Fn(&T) -> bool,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    let find = |v: &Vec<Arc<T>>| v.iter().find(|e| is(e)).cloned();
    if let Some(e) = find(&list.read().unwrap_or_else(|p| p.into_inner())) {
        return e;
    }
    let mut list = list.write().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = find(&list) {
        return e;
    }
    let e = Arc::new(make());
    list.push(e.clone());
    e
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
        let flows = Arc::new(Flows {
            by_name: RwLock::default(),
            overflow: Arc::new(FlowAttrs::new(KeyValue::new("otel.metric.overflow", true))),
        });
        let observe = |name: &'static str, description: &'static str, read: fn(&Flows, Put<'_>)| {
            let flows = flows.clone();
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |o| read(&flows, &mut |n, attrs| o.observe(n, attrs)))
                .build()
        };
        let started = observe("orchestrix.runs.started", "Runs started", |flows, put| {
            flows.each(|f| match f.started.load(Relaxed) {
                0 => {}
                n => put(n, &f.flow),
            });
        });
        let finished =
            observe("orchestrix.runs.finished", "Runs ended, by status", |flows, put| {
                flows.each(|f| {
                    for e in f.ended.read().unwrap_or_else(|p| p.into_inner()).iter() {
                        put(e.count.load(Relaxed), &e.attrs);
                    }
                });
            });
        let attempts =
            observe("orchestrix.step.attempts", "Step attempts, by outcome", |flows, put| {
                flows.each(|f| {
                    for s in f.steps.read().unwrap_or_else(|p| p.into_inner()).iter() {
                        for (n, attrs) in s.attempts.iter().zip(&s.outcomes) {
                            match n.load(Relaxed) {
                                0 => {}
                                n => put(n, attrs),
                            }
                        }
                    }
                });
            });
        let paused = observe(
            "orchestrix.runs.paused",
            "Runs paused for an operator when a step's retries ran out",
            |flows, put| {
                flows.each(|f| {
                    for s in f.steps.read().unwrap_or_else(|p| p.into_inner()).iter() {
                        match s.paused.load(Relaxed) {
                            0 => {}
                            n => put(n, &s.base),
                        }
                    }
                });
            },
        );
        let in_flight = {
            let flows = flows.clone();
            meter
                .i64_observable_up_down_counter("orchestrix.runs.in_flight")
                .with_description("Runs live")
                .with_callback(move |o| {
                    flows.each(|f| {
                        if f.started.load(Relaxed) > 0 {
                            o.observe(f.in_flight.load(Relaxed), &f.flow);
                        }
                    });
                })
                .build()
        };
        RunMetrics {
            run_duration: meter
                .f64_histogram("orchestrix.run.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_description("Run start to end")
                .build(),
            step_duration: meter
                .f64_histogram("orchestrix.step.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_description("First attempt to final outcome of a step or compensation")
                .build(),
            operator: meter
                .u64_counter("orchestrix.operator.actions")
                .with_description("Operators' actions on runs")
                .build(),
            flows,
            _observed: ([started, finished, attempts, paused], in_flight),
        }
    }

    /// Instruments on the global meter provider (what
    /// `orchestrix_worker::telemetry::init` sets up).
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("orchestrix"))
    }

    /// The attribute sets and counts of `flow`.
    fn flow(&self, flow: &str) -> Arc<FlowAttrs> {
        let by_name = &self.flows.by_name;
        if let Some(f) = by_name.read().unwrap_or_else(|p| p.into_inner()).get(flow) {
            return f.clone();
        }
        let mut by_name = by_name.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = by_name.get(flow) {
            return f.clone();
        }
        if by_name.len() >= MAX_FLOWS {
            return self.flows.overflow.clone();
        }
        let f = Arc::new(FlowAttrs::new(KeyValue::new("flow", Arc::<str>::from(flow))));
        by_name.insert(flow.into(), f.clone());
        f
    }

    fn step(&self, e: &StepEvent<'_>) -> Arc<StepAttrs> {
        self.flow(e.flow).step(e.step, e.kind, &self.step_duration)
    }

    fn attempt(&self, e: &StepEvent<'_>, outcome: usize) -> Arc<StepAttrs> {
        let step = self.step(e);
        step.attempts[outcome].fetch_add(1, Relaxed);
        step
    }
}

impl Hooks for RunMetrics {
    fn on_run_start(&self, _run_id: Uuid, flow: &str) {
        let f = self.flow(flow);
        f.started.fetch_add(1, Relaxed);
        f.in_flight.fetch_add(1, Relaxed);
    }

    fn on_step_retry(&self, e: &StepEvent<'_>, _error: &str, _delay: Duration) {
        self.attempt(e, RETRIED);
    }

    fn on_step_success(&self, e: &StepEvent<'_>, d: Duration) {
        let step = self.attempt(e, COMPLETED);
        step.duration.record(d);
    }

    fn on_step_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, FAILED);
    }

    fn on_compensation_success(&self, e: &StepEvent<'_>, d: Duration) {
        debug_assert_eq!(e.kind, CommandKind::Compensate);
        let step = self.attempt(e, COMPLETED);
        step.duration.record(d);
    }

    fn on_compensation_failure(&self, e: &StepEvent<'_>, _error: &str) {
        self.attempt(e, FAILED);
    }

    fn on_run_paused(&self, e: &StepEvent<'_>, _error: &str) {
        self.step(e).paused.fetch_add(1, Relaxed);
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
        f.in_flight.fetch_sub(1, Relaxed);
        let ended = f.ended(report.status.as_str(), &self.run_duration);
        ended.count.fetch_add(1, Relaxed);
        ended.duration.record(report.duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flows past the cap share one overflow series; the ones before keep
    /// their own.
    #[test]
    fn flows_past_the_cap_count_in_the_overflow_series() {
        let m = RunMetrics::new(&opentelemetry::global::meter("test"));
        for i in 0..MAX_FLOWS {
            m.on_run_start(Uuid::nil(), &format!("flow-{i}"));
        }
        m.on_run_start(Uuid::nil(), "one-too-many");
        m.on_run_start(Uuid::nil(), "flow-7");
        assert!(Arc::ptr_eq(&m.flow("one-too-many"), &m.flows.overflow));
        assert_eq!(m.flows.overflow.started.load(Relaxed), 1);
        assert_eq!(m.flow("flow-7").started.load(Relaxed), 2);
        assert_eq!(m.flows.overflow.flow[0].key.as_str(), "otel.metric.overflow");
    }
}
