//! A run paused for an operator on the embedded engine stays live, with
//! nothing of its own under way, until the operator acts.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{RetryPolicy, RunOptions, RunStatus, create};
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
