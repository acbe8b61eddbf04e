//! A run paused for an operator on the embedded engine stays live, with
//! nothing of its own under way, until the operator acts: resumed, paused
//! again, rolled back or cancelled, whether or not its caller still holds
//! its handle.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{Coordinator, RetryPolicy, RunOptions, RunStatus, create};
use orchestrix_proto::RunId;
use orchestrix_worker::StepError;

#[test]
fn a_paused_run_waits_for_its_operator_and_its_caller_gets_the_report() {
    paused(|| async {
        let flow = create::<()>("pausing").step_with(
            "a",
            |_| async { Err::<(), _>(StepError::retryable("down")) },
            |o| o.retry(RetryPolicy::new().retries(0)).pause_when_exhausted(),
        );
        let handle = flow.start((), RunOptions::new()).await.unwrap();
        let id = handle.run_id();
        let c = flow.embedded().unwrap().clone();
        // No pause timeout: nothing is scheduled while it waits.
        loop {
            let now = c.status(id).await.unwrap().unwrap();
            if now.status == RunStatus::Paused {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(c.status(id).await.unwrap().unwrap().status, RunStatus::Paused);
        c.rollback(id, "ops").await.unwrap();
        // The caller still holds its handle: the run's own actor answers it.
        let report = tokio::time::timeout(Duration::from_secs(60), handle.report())
            .await
            .expect("the report comes")
            .unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        assert_eq!(report.actions.len(), 1, "{report}");
    });
}

async fn until_paused(c: &Coordinator, id: RunId) {
    loop {
        if c.status(id).await.unwrap().unwrap().status == RunStatus::Paused {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fails `fails` times, then succeeds.
fn flaky(name: &str, fails: u32) -> orchestrix_coordinator::Flow<()> {
    let n = Arc::new(AtomicU32::new(0));
    create::<()>(name)
        .step_with("reserve", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
        .step_with(
            "charge",
            move |_| {
                let n = n.clone();
                async move {
                    if n.fetch_add(1, Ordering::SeqCst) < fails {
                        return Err(StepError::retryable("down"));
                    }
                    Ok(())
                }
            },
            |o| o.retry(RetryPolicy::new().retries(0)).pause_when_exhausted(),
        )
}

#[test]
fn a_paused_run_whose_caller_let_go_is_resumed_paused_again_and_rolled_back() {
    paused(|| async {
        let flow = flaky("p1", 2);
        let handle = flow.start((), RunOptions::new()).await.unwrap();
        let id = handle.run_id();
        drop(handle);
        let c = flow.embedded().unwrap().clone();
        until_paused(&c, id).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        c.resume(id, "ops").await.unwrap();
        // Fails again: paused again, still live.
        tokio::time::sleep(Duration::from_millis(50)).await;
        until_paused(&c, id).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        c.rollback(id, "ops").await.unwrap();
        let report =
            tokio::time::timeout(Duration::from_secs(60), c.wait(id)).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        assert_eq!(report.actions.len(), 2, "{report}");
        // Finished: operators are told so, not "not live".
        let e = c.cancel(id, "ops", None).await.unwrap_err().to_string();
        assert!(e.contains("already finished"), "{e}");
    });
}

#[test]
fn a_paused_run_is_cancelled_and_resumed_to_completion() {
    paused(|| async {
        let flow = flaky("p2", 1);
        let c = flow.embedded().unwrap().clone();
        let handle = flow.start((), RunOptions::new()).await.unwrap();
        let id = handle.run_id();
        until_paused(&c, id).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        c.cancel(id, "ops", Some("why")).await.unwrap();
        let report =
            tokio::time::timeout(Duration::from_secs(60), handle.report()).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Cancelled, "{report}");

        let handle = flow.start((), RunOptions::new()).await.unwrap();
        let report =
            tokio::time::timeout(Duration::from_secs(60), handle.report()).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
    });
}
