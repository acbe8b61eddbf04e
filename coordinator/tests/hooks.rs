//! Hooks are called in order, for every transition, and cannot break a run.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{
    Coordinator, Hooks, RunOptions, RunReport, RunStatus, StepEvent, create,
};
use orchestrix_worker::StepError;
use uuid::Uuid;

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Hooks for Recorder {
    fn on_run_start(&self, _run_id: Uuid, flow: &str) {
        self.push(format!("run start {flow}"));
    }
    fn on_step_start(&self, e: &StepEvent<'_>) {
        self.push(format!("step start {} #{}", e.step, e.attempt));
    }
    fn on_step_retry(&self, e: &StepEvent<'_>, error: &str, delay: Duration) {
        self.push(format!(
            "retry {} {} #{} after {delay:?}: {error}",
            e.kind.as_str(),
            e.step,
            e.attempt
        ));
    }
    fn on_step_success(&self, e: &StepEvent<'_>, _d: Duration) {
        self.push(format!("step ok {} #{}", e.step, e.attempt));
    }
    fn on_step_failure(&self, e: &StepEvent<'_>, error: &str) {
        self.push(format!("step failed {} #{}: {error}", e.step, e.attempt));
    }
    fn on_compensation_start(&self, e: &StepEvent<'_>) {
        self.push(format!("compensate {}", e.step));
    }
    fn on_compensation_success(&self, e: &StepEvent<'_>, _d: Duration) {
        self.push(format!("compensated {} #{}", e.step, e.attempt));
    }
    fn on_compensation_failure(&self, e: &StepEvent<'_>, error: &str) {
        self.push(format!("compensation failed {}: {error}", e.step));
    }
    fn on_run_end(&self, report: &RunReport) {
        self.push(format!("run end {}", report.status));
    }
}

#[test]
fn hooks_see_every_transition_in_order() {
    paused(|| async {
        let rec = Recorder::default();
        let flow = create::<u32>("payment-flow")
            .step_with(
                "reserve-stock",
                |_| async { Ok(()) },
                |o| o.compensate(|_| async { Ok(()) }),
            )
            .step_with(
                "process-payment",
                |ctx| async move {
                    if ctx.input > 1000 {
                        return Err::<(), _>(StepError::retryable(
                            "Payment declined: limit exceeded",
                        ));
                    }
                    Ok(())
                },
                |o| o.retries(1).retry_delay(Duration::from_millis(1000)),
            )
            .step("send-email", |_| async { Ok(()) })
            .hooks(rec.clone());

        flow.run(50).await.unwrap();
        assert_eq!(
            rec.calls(),
            [
                "run start payment-flow",
                "step start reserve-stock #1",
                "step ok reserve-stock #1",
                "step start process-payment #1",
                "step ok process-payment #1",
                "step start send-email #1",
                "step ok send-email #1",
                "run end completed",
            ]
        );

        rec.0.lock().unwrap().clear();
        flow.run(2000).await.unwrap();
        assert_eq!(
            rec.calls(),
            [
                "run start payment-flow",
                "step start reserve-stock #1",
                "step ok reserve-stock #1",
                "step start process-payment #1",
                "retry execute process-payment #1 after 1s: Payment declined: limit exceeded",
                "step start process-payment #2",
                "step failed process-payment #2: Payment declined: limit exceeded",
                "compensate reserve-stock",
                "compensated reserve-stock #1",
                "run end failed",
            ]
        );
    });
}

#[test]
fn compensation_failures_and_retries_reach_the_hooks() {
    paused(|| async {
        let rec = Recorder::default();
        let flow = create::<()>("f")
            .step_with(
                "a",
                |_| async { Ok(()) },
                |o| {
                    o.compensation_retry(orchestrix_coordinator::RetryPolicy::new().retries(1))
                        .compensate(|_| async { Err::<(), _>(StepError::retryable("stuck")) })
                },
            )
            .step("b", |_| async { Err::<(), _>(StepError::permanent("no")) })
            .hooks(rec.clone());
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::CompensationFailed);
        let calls = rec.calls();
        assert_eq!(
            calls[calls.len() - 4..],
            [
                "compensate a",
                "retry compensate a #1 after 100ms: stuck",
                "compensation failed a: stuck",
                "run end compensation_failed",
            ]
        );
    });
}

struct Panicky;

impl Hooks for Panicky {
    fn on_step_start(&self, _e: &StepEvent<'_>) {
        panic!("hook bug");
    }
    fn on_run_end(&self, _r: &RunReport) {
        panic!("hook bug at the end");
    }
}

#[test]
fn a_panicking_hook_does_not_break_the_run() {
    paused(|| async {
        let rec = Recorder::default();
        let flow = create::<()>("f").step("a", |_| async { Ok(()) });
        let coordinator =
            Coordinator::builder().flow(&flow).hooks(Panicky).hooks(rec.clone()).build().unwrap();
        let report = coordinator.run("f", &(), RunOptions::new()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed);
        // Hooks after the panicking one still ran.
        assert_eq!(rec.calls().last().map(String::as_str), Some("run end completed"));
    });
}
