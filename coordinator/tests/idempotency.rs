//! Idempotency keys: sequential, concurrent, after the ttl.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{Coordinator, Flow, RunOptions, RunStatus, create};

fn counting(slow: Duration) -> (Flow<u32>, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let flow = create::<u32>("charge").step("charge", move |ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(slow).await;
            Ok(ctx.input)
        }
    });
    (flow, runs)
}

fn key() -> RunOptions {
    RunOptions::new().key("payment:order_1").ttl(Duration::from_secs(60))
}

#[test]
fn a_second_run_with_the_key_returns_the_first_report() {
    paused(|| async {
        let (flow, runs) = counting(Duration::ZERO);
        let first = flow.run_with(50, key()).await.unwrap();
        let second = flow.run_with(999, key()).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(second, first);
        assert_eq!(
            second.step("charge").unwrap().output.as_ref().unwrap().decode::<u32>().unwrap(),
            50
        );
        // Another key is another run.
        flow.run_with(1, RunOptions::new().key("payment:order_2")).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn concurrent_callers_with_one_key_share_one_execution() {
    paused(|| async {
        let (flow, runs) = counting(Duration::from_millis(500));
        let coordinator = Coordinator::builder().flow(&flow).build().unwrap();
        let starts = (0..50).map(|i| {
            let c = coordinator.clone();
            async move { c.start("charge", &i, key()).await.unwrap() }
        });
        let handles = futures::future::join_all(starts).await;
        let first_id = handles[0].run_id();
        assert_eq!(handles.iter().filter(|h| !h.is_duplicate()).count(), 1);
        assert!(handles.iter().all(|h| h.run_id() == first_id));
        let reports = futures::future::join_all(handles.into_iter().map(|h| h.report())).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        for r in reports {
            let r = r.unwrap();
            assert_eq!((r.run_id, r.status), (first_id, RunStatus::Completed));
        }
    });
}

#[test]
fn the_key_is_free_again_after_its_ttl() {
    paused(|| async {
        let (flow, runs) = counting(Duration::ZERO);
        let first = flow.run_with(1, key()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(flow.run_with(2, key()).await.unwrap().run_id, first.run_id);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = flow.run_with(3, key()).await.unwrap();
        assert_ne!(later.run_id, first.run_id);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn the_ttl_counts_from_the_end_of_the_run() {
    paused(|| async {
        let (flow, runs) = counting(Duration::from_secs(120));
        let coordinator = Coordinator::builder().flow(&flow).build().unwrap();
        let first = coordinator.start("charge", &1, key()).await.unwrap();
        // Longer than the ttl after the start, but the run is still live.
        tokio::time::sleep(Duration::from_secs(90)).await;
        let dup = coordinator.start("charge", &2, key()).await.unwrap();
        assert!(dup.is_duplicate());
        assert_eq!(dup.run_id(), first.run_id());
        first.report().await.unwrap();
        dup.report().await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn status_and_wait_follow_a_run_by_id() {
    paused(|| async {
        let (flow, _) = counting(Duration::from_secs(1));
        let coordinator = Coordinator::builder().flow(&flow).build().unwrap();
        let handle = coordinator.start("charge", &5, RunOptions::new()).await.unwrap();
        let id = handle.run_id();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let live = coordinator.status(id).await.unwrap().unwrap();
        assert_eq!(live.status, RunStatus::Running);
        assert_eq!(live.steps[0].status, orchestrix_coordinator::StepStatus::Running);
        let done = coordinator.wait(id).await.unwrap();
        assert_eq!(done.status, RunStatus::Completed);
        assert_eq!(coordinator.status(id).await.unwrap().unwrap(), done);
        assert!(coordinator.status(uuid::Uuid::new_v4().into()).await.unwrap().is_none());
    });
}

#[test]
fn unknown_and_invalid_flows_are_clear_errors() {
    paused(|| async {
        let (flow, _) = counting(Duration::ZERO);
        let coordinator = Coordinator::builder().flow(&flow).build().unwrap();
        let err = coordinator.run("nope", &1, RunOptions::new()).await.unwrap_err();
        assert_eq!(err.to_string(), "unknown flow `nope`");

        let bad = create::<()>("bad name").step("s", |_| async { Ok(()) });
        let err = bad.run(()).await.unwrap_err();
        assert!(err.to_string().contains("flow name `bad name` may only hold"), "{err}");

        let dup =
            create::<()>("dup").step("s", |_| async { Ok(()) }).step("s", |_| async { Ok(()) });
        let err = dup.run(()).await.unwrap_err();
        assert_eq!(err.to_string(), "invalid flow: flow `dup` has two steps named `s`");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_on_many_threads_with_one_key_share_one_execution() {
    let (flow, runs) = counting(Duration::from_millis(20));
    let coordinator = Coordinator::builder().flow(&flow).build().unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = coordinator.clone();
            tokio::spawn(async move { c.run("charge", &i, key()).await.unwrap() })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().run_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
