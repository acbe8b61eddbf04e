//! Cancelling a run on the embedded engine: the step in hand is dropped,
//! what completed is compensated in reverse, the run ends `cancelled`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Journal, paused};
use orchestrix_coordinator::{Flow, RunError, RunOptions, RunStatus, StepStatus, create};

/// `a` and `b` complete; `c` waits until it is dropped or cancelled (its
/// context's cancellation is logged). Every step has a compensation.
fn flow(j: &Journal) -> Flow<()> {
    let mut flow = create::<()>("cancellable");
    for name in ["a", "b", "c"] {
        let (run, undo) = (j.clone(), j.clone());
        flow = flow.step_with(
            name,
            move |ctx| {
                let run = run.clone();
                async move {
                    run.log(format!("run {name}"));
                    if name == "c" {
                        // Logged only if the future is dropped (a guard) …
                        struct Dropped(Journal);
                        impl Drop for Dropped {
                            fn drop(&mut self) {
                                self.0.log("c dropped");
                            }
                        }
                        let _guard = Dropped(run.clone());
                        ctx.cancellation().cancelled().await;
                        run.log("c saw its cancellation");
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            },
            move |o| {
                o.compensate(move |_| {
                    let undo = undo.clone();
                    async move {
                        undo.log(format!("undo {name}"));
                        Ok(())
                    }
                })
            },
        );
    }
    flow
}

#[test]
fn a_cancelled_run_drops_its_step_and_compensates_in_reverse() {
    paused(|| async {
        let j = Journal::new();
        let flow = flow(&j);
        let handle = flow.start((), RunOptions::new()).await.unwrap();
        // Let `c` start.
        while !j.entries().contains(&"run c".to_owned()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handle.cancel("ops@host", Some("customer asked")).await.unwrap();
        // Twice is harmless.
        handle.cancel("ops@host", None).await.unwrap();
        let id = handle.run_id();
        let report = handle.report().await.unwrap();
        assert_eq!(report.status, RunStatus::Cancelled, "{report}");
        let steps: Vec<_> = report.steps.iter().map(|s| (s.name.as_str(), s.status)).collect();
        assert_eq!(
            steps,
            [
                ("a", StepStatus::Compensated),
                ("b", StepStatus::Compensated),
                ("c", StepStatus::Compensated),
            ],
            "the step in hand may have acted: it is compensated too"
        );
        let log = j.entries();
        assert!(log.contains(&"c dropped".to_owned()), "{log:?}");
        let undo: Vec<_> = log.iter().filter(|l| l.starts_with("undo")).collect();
        assert_eq!(undo, ["undo c", "undo b", "undo a"], "reverse order");
        assert_eq!(report.actions.len(), 1, "the second cancel is not recorded again");
        assert_eq!(report.actions[0].by, "ops@host");
        assert_eq!(report.actions[0].reason.as_deref(), Some("customer asked"));
        assert_eq!(report.error.as_deref(), Some("cancelled by ops@host: customer asked"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["status"], "cancelled");
        assert_eq!(json["actions"][0]["action"], "cancel");
        // Cancelled already: harmless. Finished otherwise: refused, with the status.
        flow.embedded().unwrap().cancel(id, "ops", None).await.unwrap();
        let done = create::<()>("done").step("x", |_| async { Ok(()) });
        let h = done.start((), RunOptions::new()).await.unwrap();
        let id = h.run_id();
        assert_eq!(h.report().await.unwrap().status, RunStatus::Completed);
        let err = done.embedded().unwrap().cancel(id, "ops", None).await.unwrap_err();
        let refused =
            matches!(&err, RunError::Refused(why) if why.ends_with("already finished: completed"));
        assert!(refused, "{err}");
    });
}

#[test]
fn operator_actions_right_after_start_and_on_cancelled_runs() {
    paused(|| async {
        let j = Journal::new();
        let flow = flow(&j);
        // At once after the start: the run's actor may not be up yet.
        let handle = flow.start((), RunOptions::new()).await.unwrap();
        let huge = "x".repeat(900_000);
        handle.cancel("ops\u{1b}[31m\n", Some(&format!("{huge}\nforged line"))).await.unwrap();
        let id = handle.run_id();
        let report = handle.report().await.unwrap();
        assert_eq!(report.status, RunStatus::Cancelled, "{report}");
        let action = &report.actions[0];
        assert_eq!(action.by, "ops[31m", "no control characters");
        assert_eq!(action.reason.as_ref().unwrap().len(), 1024, "bounded");
        // Resume and rollback of a cancelled run are refused, not "accepted".
        let c = flow.embedded().unwrap();
        for err in
            [c.resume(id, "ops").await.unwrap_err(), c.rollback(id, "ops").await.unwrap_err()]
        {
            assert!(
                matches!(&err, RunError::Refused(why) if why.contains("already finished: cancelled")),
                "{err}"
            );
        }
        // Who acts must be said.
        let h = flow.start((), RunOptions::new()).await.unwrap();
        let err = h.cancel("  ", None).await.unwrap_err();
        assert!(err.to_string().contains("needs who"), "{err}");
        h.cancel("ops", None).await.unwrap();
        assert_eq!(h.report().await.unwrap().status, RunStatus::Cancelled);
    });
}
