//! Rollback: which steps are compensated, in which order, and what the report says.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Journal, paused};
use orchestrix_coordinator::{Flow, RunStatus, StepStatus, create};
use orchestrix_worker::StepError;

const MS: Duration = Duration::from_millis(1);

/// Six steps; `fail_at` fails for good; steps listed in `no_comp` have no
/// compensation; compensations of steps in `comp_fails` always fail.
fn six_steps(j: &Journal, fail_at: usize, no_comp: &[usize], comp_fails: &[usize]) -> Flow<()> {
    let mut flow = create::<()>("six");
    for i in 0..6 {
        let (run, undo) = (j.clone(), j.clone());
        let has_comp = !no_comp.contains(&i);
        let comp_fails = comp_fails.contains(&i);
        flow = flow.step_with(
            &format!("s{i}"),
            move |_| {
                let run = run.clone();
                async move {
                    run.log(format!("run s{i}"));
                    if i == fail_at {
                        return Err(StepError::permanent(format!("s{i} broke")));
                    }
                    Ok(i * 10)
                }
            },
            move |o| {
                if !has_comp {
                    return o;
                }
                o.compensation_retry(
                    orchestrix_coordinator::RetryPolicy::new().retries(2).retry_delay(10 * MS),
                )
                .compensate(move |ctx| {
                    let undo = undo.clone();
                    async move {
                        // A compensation sees its own step's output.
                        let out: usize = ctx.output(&format!("s{i}"))?;
                        undo.log(format!("undo s{i} ({out}) #{}", ctx.attempt()));
                        if comp_fails {
                            return Err(StepError::retryable(format!("cannot undo s{i}")));
                        }
                        Ok(())
                    }
                })
            },
        );
    }
    flow
}

#[test]
fn completed_steps_are_compensated_in_reverse_and_the_failed_one_is_not() {
    paused(|| async {
        let j = Journal::new();
        let report = six_steps(&j, 4, &[], &[]).run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        assert_eq!(
            j.entries(),
            [
                "run s0",
                "run s1",
                "run s2",
                "run s3",
                "run s4",
                "undo s3 (30) #1",
                "undo s2 (20) #1",
                "undo s1 (10) #1",
                "undo s0 (0) #1",
            ]
        );
        let statuses: Vec<_> = report.steps.iter().map(|s| s.status).collect();
        use StepStatus::*;
        assert_eq!(statuses, [Compensated, Compensated, Compensated, Compensated, Failed, NotRun]);
        assert_eq!(report.failed_step.as_deref(), Some("s4"));
        assert_eq!(report.error.as_deref(), Some("s4 broke"));
        assert_eq!(report.step("s5").unwrap().attempts, 0);
        assert_eq!(report.step("s0").unwrap().compensation.as_ref().unwrap().attempts, 1);
    });
}

#[test]
fn steps_without_compensation_are_skipped_in_the_rollback() {
    paused(|| async {
        let j = Journal::new();
        let report = six_steps(&j, 5, &[1, 3], &[]).run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        let undos: Vec<_> = j.entries().into_iter().filter(|e| e.starts_with("undo")).collect();
        assert_eq!(undos, ["undo s4 (40) #1", "undo s2 (20) #1", "undo s0 (0) #1"]);
        assert_eq!(report.step("s1").unwrap().status, StepStatus::Completed);
        assert_eq!(report.step("s3").unwrap().status, StepStatus::Completed);
        assert!(report.step("s3").unwrap().compensation.is_none());
    });
}

#[test]
fn a_failure_at_the_first_step_compensates_nothing() {
    paused(|| async {
        let j = Journal::new();
        let report = six_steps(&j, 0, &[], &[]).run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        assert_eq!(j.entries(), ["run s0"]);
    });
}

#[test]
fn a_compensation_that_keeps_failing_is_retried_then_named_and_the_rest_still_run() {
    paused(|| async {
        let j = Journal::new();
        let report = six_steps(&j, 3, &[], &[1]).run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::CompensationFailed);
        let undos: Vec<_> = j.entries().into_iter().filter(|e| e.starts_with("undo")).collect();
        assert_eq!(
            undos,
            [
                "undo s2 (20) #1",
                "undo s1 (10) #1",
                "undo s1 (10) #2",
                "undo s1 (10) #3",
                "undo s0 (0) #1"
            ]
        );
        let s1 = report.step("s1").unwrap();
        assert_eq!(s1.status, StepStatus::CompensationFailed);
        let comp = s1.compensation.as_ref().unwrap();
        assert_eq!((comp.attempts, comp.error.as_deref()), (3, Some("cannot undo s1")));
        let left: Vec<_> = report.uncompensated().map(|s| s.name.as_str()).collect();
        assert_eq!(left, ["s1"]);
        assert_eq!(report.step("s0").unwrap().status, StepStatus::Compensated);
        assert!(report.to_string().contains("s1: compensation_failed"));
    });
}

#[test]
fn a_compensation_that_recovers_counts_its_attempts() {
    paused(|| async {
        let j = Journal::new();
        let log = j.clone();
        let flow = create::<()>("recovering")
            .step_with(
                "a",
                |_| async { Ok(()) },
                move |o| {
                    o.compensate(move |ctx| {
                        let log = log.clone();
                        async move {
                            log.log(format!("undo a #{}", ctx.attempt()));
                            if ctx.attempt() < 2 {
                                return Err(StepError::retryable("locked"));
                            }
                            Ok(())
                        }
                    })
                },
            )
            .step("b", |_| async { Err::<(), _>(StepError::permanent("no")) });
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        let comp = report.step("a").unwrap().compensation.clone().unwrap();
        assert_eq!((comp.attempts, comp.error.as_deref()), (2, Some("locked")));
        // Default compensation policy: 100 ms before the first retry.
        assert_eq!(comp.duration, Some(100 * MS));
        assert_eq!(j.entries(), ["undo a #1", "undo a #2"]);
    });
}

#[test]
fn later_steps_read_earlier_outputs() {
    paused(|| async {
        let flow = create::<u32>("outputs")
            .step("reserve", |ctx| async move { Ok(format!("res-{}", ctx.input)) })
            .step("charge", |ctx| async move {
                let reservation: String = ctx.output("reserve")?;
                Ok(format!("{reservation}/paid"))
            })
            .step("missing", |ctx| async move { ctx.output::<String>("nope") });
        let report = flow.run(7).await.unwrap();
        let charge = report.step("charge").unwrap().output.as_ref().unwrap();
        assert_eq!(charge.decode::<String>().unwrap(), "res-7/paid");
        assert_eq!(report.status, RunStatus::Failed);
        assert_eq!(report.error.as_deref(), Some("no output of step `nope` is available"));
    });
}
