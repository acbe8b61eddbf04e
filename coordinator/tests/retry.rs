//! Attempts, delays, backoff, jitter, timeouts and permanent errors, on paused time.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Journal, paused};
use orchestrix_coordinator::{RunStatus, StepStatus, create};
use orchestrix_worker::StepError;

const MS: Duration = Duration::from_millis(1);

#[test]
fn retries_n_means_n_plus_one_attempts_with_the_delay_between() {
    paused(|| async {
        let j = Journal::new();
        let log = j.clone();
        let flow = create::<u32>("pay").step_with(
            "charge",
            move |_ctx| {
                let log = log.clone();
                async move {
                    log.log("charge");
                    Err::<(), _>(StepError::retryable("provider down"))
                }
            },
            |o| o.retries(3).retry_delay(1000 * MS),
        );
        let report = flow.run(1).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        let step = report.step("charge").unwrap();
        assert_eq!(step.attempts, 4);
        assert_eq!(step.status, StepStatus::Failed);
        assert_eq!(step.error.as_deref(), Some("provider down"));
        assert_eq!(j.times_of("charge"), [0, 1000, 2000, 3000].map(|n| n * MS));
        common::assert_ms(report.duration, 3000 * MS);
    });
}

#[test]
fn a_step_that_recovers_completes_and_keeps_its_last_error() {
    paused(|| async {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let flow = create::<()>("flaky").step_with(
            "call",
            move |ctx| {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if ctx.attempt() < 3 {
                        return Err(StepError::retryable(format!(
                            "attempt {} failed",
                            ctx.attempt()
                        )));
                    }
                    Ok(ctx.attempt())
                }
            },
            |o| o.retries(5).retry_delay(10 * MS),
        );
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed);
        let step = report.step("call").unwrap();
        assert_eq!((step.attempts, calls.load(Ordering::SeqCst)), (3, 3));
        assert_eq!(step.error.as_deref(), Some("attempt 2 failed"));
        assert_eq!(step.output.as_ref().unwrap().decode::<u32>().unwrap(), 3);
        assert_eq!(step.duration, Some(20 * MS));
    });
}

#[test]
fn exponential_backoff_is_capped_by_max_delay() {
    paused(|| async {
        let j = Journal::new();
        let log = j.clone();
        let flow = create::<()>("backoff").step_with(
            "s",
            move |_| {
                let log = log.clone();
                async move {
                    log.log("s");
                    Err::<(), _>(StepError::retryable("no"))
                }
            },
            |o| o.retries(5).retry_delay(100 * MS).backoff(2.0).max_delay(500 * MS),
        );
        flow.run(()).await.unwrap();
        // Delays 100, 200, 400, 500 (capped), 500.
        assert_eq!(j.times_of("s"), [0, 100, 300, 700, 1200, 1700].map(|n| n * MS));
    });
}

#[test]
fn jittered_delays_stay_within_their_band() {
    paused(|| async {
        let j = Journal::new();
        let log = j.clone();
        let flow = create::<()>("jitter").step_with(
            "s",
            move |_| {
                let log = log.clone();
                async move {
                    log.log("s");
                    Err::<(), _>(StepError::retryable("no"))
                }
            },
            |o| o.retries(20).retry_delay(1000 * MS).jitter(0.5),
        );
        flow.run(()).await.unwrap();
        let times = j.times_of("s");
        assert_eq!(times.len(), 21);
        let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for g in &gaps {
            assert!((500 * MS..=1500 * MS).contains(g), "gap {g:?} outside 1000 ms ± 50 %");
        }
        // 20 draws are not all the same: jitter is applied.
        assert!(gaps.iter().any(|g| *g != gaps[0]));
    });
}

#[test]
fn max_duration_stops_retrying_early() {
    paused(|| async {
        let flow = create::<()>("bounded").step_with(
            "s",
            |_| async { Err::<(), _>(StepError::retryable("no")) },
            |o| {
                o.retry(
                    orchestrix_coordinator::RetryPolicy::new()
                        .retries(100)
                        .retry_delay(100 * MS)
                        .max_duration(350 * MS),
                )
            },
        );
        let report = flow.run(()).await.unwrap();
        // Attempts at 0, 100, 200, 300; a fifth at 400 would pass 350 ms.
        assert_eq!(report.step("s").unwrap().attempts, 4);
    });
}

#[test]
fn permanent_errors_skip_the_remaining_retries() {
    paused(|| async {
        let flow = create::<()>("declined").step_with(
            "charge",
            |_| async { Err::<(), _>(StepError::permanent("card declined")) },
            |o| o.retries(10).retry_delay(1000 * MS),
        );
        let report = flow.run(()).await.unwrap();
        let step = report.step("charge").unwrap();
        assert_eq!((step.attempts, report.duration), (1, Duration::ZERO));
        assert_eq!(report.error.as_deref(), Some("card declined"));
    });
}

#[test]
fn a_timed_out_attempt_of_an_idempotent_step_is_dropped_and_retried() {
    paused(|| async {
        let j = Journal::new();
        let log = j.clone();
        let flow = create::<()>("slow").step_with(
            "s",
            move |ctx| {
                let log = log.clone();
                async move {
                    log.log(format!("start {}", ctx.attempt()));
                    if ctx.attempt() < 3 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        log.log("never: the attempt was dropped");
                    }
                    Ok(())
                }
            },
            |o| o.timeout(200 * MS).retries(2).retry_delay(50 * MS).idempotent(),
        );
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed);
        let step = report.step("s").unwrap();
        assert_eq!(step.attempts, 3);
        assert_eq!(step.error.as_deref(), Some("outcome unknown: step timed out after 200ms"));
        assert_eq!(j.entries(), ["start 1", "start 2", "start 3"]);
        // Two timeouts and two delays, not the 60 s of a handler waited for.
        // Within 10 ms rather than 1: on a loaded machine (a CI run beside a
        // release build) this test once measured 495 ms, the paused clock
        // having moved on while the run's start was being recorded.
        let d = report.duration;
        assert!(d >= 490 * MS && d <= 510 * MS, "{d:?} is not 500ms");
    });
}

#[test]
fn a_timed_out_attempt_is_maybe_done_by_default_never_run_twice_and_compensated() {
    paused(|| async {
        let j = Journal::new();
        let (log, undo) = (j.clone(), j.clone());
        let flow = create::<()>("charge").step_with(
            "charge",
            move |_ctx| {
                let log = log.clone();
                async move {
                    log.log("charge");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                }
            },
            move |o| {
                o.timeout(200 * MS).retries(2).retry_delay(50 * MS).compensate(move |_ctx| {
                    let undo = undo.clone();
                    async move {
                        undo.log("refund");
                        Ok(())
                    }
                })
            },
        );
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        let step = report.step("charge").unwrap();
        assert_eq!(step.attempts, 1, "an unknown outcome is not retried by default");
        assert_eq!(step.status, StepStatus::Compensated);
        assert_eq!(step.error.as_deref(), Some("outcome unknown: step timed out after 200ms"));
        assert_eq!(j.entries(), ["charge", "refund"]);
    });
}

#[test]
fn a_panicking_handler_is_a_failed_attempt_and_the_engine_goes_on() {
    paused(|| async {
        let flow = create::<()>("panics").step_with(
            "s",
            |ctx| async move {
                if ctx.attempt() == 1 {
                    panic!("bug in handler");
                }
                Ok(())
            },
            |o| o.retries(1).retry_delay(MS),
        );
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed);
        assert_eq!(
            report.step("s").unwrap().error.as_deref(),
            Some("handler panicked: bug in handler")
        );

        // A handler that always panics fails the run; the engine still serves the next one.
        let always = create::<()>("always")
            .step("s", |_| async { panic!("again") as Result<(), StepError> });
        assert_eq!(always.run(()).await.unwrap().status, RunStatus::Failed);
        assert_eq!(flow.run(()).await.unwrap().status, RunStatus::Completed);
    });
}

#[test]
fn the_run_deadline_fails_the_run_and_compensates() {
    paused(|| async {
        let j = Journal::new();
        let (a, b) = (j.clone(), j.clone());
        let flow = create::<()>("deadline")
            .step_with(
                "reserve",
                |_| async { Ok(()) },
                move |o| {
                    o.compensate(move |_| {
                        let a = a.clone();
                        async move {
                            a.log("release");
                            Ok(())
                        }
                    })
                },
            )
            .step_with(
                "charge",
                move |_| {
                    let b = b.clone();
                    async move {
                        b.log("charge");
                        Err::<(), _>(StepError::retryable("busy"))
                    }
                },
                |o| o.retries(100).retry_delay(1000 * MS),
            );
        let opts = orchestrix_coordinator::RunOptions::new().timeout(2500 * MS);
        let report = flow.run_with((), opts).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        assert_eq!(report.error.as_deref(), Some("run deadline of 2.5s exceeded"));
        assert_eq!(j.entries(), ["charge", "charge", "charge", "release"]);
        assert_eq!(j.times_of("release"), [2500 * MS]);
    });
}
