//! Concurrency limits on the embedded engine, in paused time: runs with one
//! concurrency key take turns in arrival order, and a step's attempts in
//! flight stay under its `max_in_flight`, waiting rather than failing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Journal, paused};
use orchestrix_coordinator::{Flow, RunOptions, RunStatus, StepStatus, create};

const MS: Duration = Duration::from_millis(1);

/// One step, `work`, that logs `start {n}` and `end {n}` around 100 ms.
fn one_step(j: &Journal) -> Flow<u32> {
    let j = j.clone();
    create::<u32>("account").step("work", move |ctx| {
        let j = j.clone();
        async move {
            j.log(format!("start {}", ctx.input));
            tokio::time::sleep(MS * 100).await;
            j.log(format!("end {}", ctx.input));
            Ok(())
        }
    })
}

/// The most runs between their `start` and `end` at once.
fn most_at_once(j: &Journal) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in j.entries() {
        if e.starts_with("start") {
            now += 1;
            most = most.max(now);
        } else if e.starts_with("end") {
            now -= 1;
        }
    }
    most
}

fn starts(j: &Journal) -> Vec<String> {
    j.entries().into_iter().filter(|e| e.starts_with("start")).collect()
}

#[test]
fn runs_with_one_key_take_turns_in_arrival_order() {
    paused(|| async {
        let j = Journal::new();
        let flow = one_step(&j);
        let c = flow.embedded().unwrap().clone();
        let mut handles = Vec::new();
        for n in 0..10 {
            let opts = RunOptions::new().concurrency_key("account:42");
            handles.push(flow.start(n, opts).await.unwrap());
        }
        // One runs, the others wait, visibly.
        tokio::task::yield_now().await;
        let waiting = c.status(handles[5].run_id()).await.unwrap().unwrap();
        assert_eq!(waiting.status, RunStatus::Queued, "{waiting}");
        let queued = c
            .list(orchestrix_coordinator::ListFilter::new(Some(RunStatus::Queued), None, 100))
            .await
            .unwrap();
        assert_eq!(queued.len(), 9);
        for h in handles {
            assert_eq!(h.report().await.unwrap().status, RunStatus::Completed);
        }
        assert_eq!(most_at_once(&j), 1, "{:?}", j.entries());
        let expected: Vec<String> = (0..10).map(|n| format!("start {n}")).collect();
        assert_eq!(starts(&j), expected, "first come, first served");
    });
}

#[test]
fn a_limit_per_key_other_keys_and_a_cancelled_waiter() {
    paused(|| async {
        let j = Journal::new();
        let flow = one_step(&j).concurrency_per_key(2);
        let mut handles = Vec::new();
        for n in 0..6 {
            let opts = RunOptions::new().concurrency_key("k");
            handles.push(flow.start(n, opts).await.unwrap());
        }
        // Another key is not held back by this one.
        let other = flow.start(100, RunOptions::new().concurrency_key("other")).await.unwrap();
        // A waiting run is cancelled: it never runs, and the queue moves on.
        handles[4].cancel("ops", Some("not needed")).await.unwrap();
        let other = other.report().await.unwrap();
        assert_eq!(other.status, RunStatus::Completed);
        let mut reports = Vec::new();
        for h in handles {
            reports.push(h.report().await.unwrap());
        }
        assert_eq!(reports[4].status, RunStatus::Cancelled, "{}", reports[4]);
        assert_eq!(reports[4].steps[0].status, StepStatus::NotRun);
        assert!(
            reports.iter().enumerate().all(|(i, r)| i == 4 || r.status == RunStatus::Completed)
        );
        assert!(!j.entries().contains(&"start 4".to_owned()));
        // Two of `k` at once, plus `other` beside them.
        assert_eq!(most_at_once(&j), 3, "{:?}", j.entries());
        assert_eq!(starts(&j)[..3], ["start 0", "start 1", "start 100"]);
    });
}

#[test]
fn a_step_limit_holds_attempts_back_without_failing_them() {
    paused(|| async {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (n2, m2) = (now.clone(), most.clone());
        let flow = create::<u32>("fragile").step("prepare", |_| async { Ok(()) }).step_with(
            "call",
            move |_| {
                let (now, most) = (n2.clone(), m2.clone());
                async move {
                    let at = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(at, Ordering::SeqCst);
                    tokio::time::sleep(MS * 50).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
            |o| o.max_in_flight(2),
        );
        let mut handles = Vec::new();
        for n in 0..20 {
            handles.push(flow.start(n, RunOptions::new()).await.unwrap());
        }
        for h in handles {
            let r = h.report().await.unwrap();
            assert_eq!(r.status, RunStatus::Completed, "{r}");
            assert_eq!(r.step("call").unwrap().attempts, 1, "waiting is not an attempt");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn keys_that_cannot_be_stored_are_refused_and_the_limit_may_come_first() {
    paused(|| async {
        let j = Journal::new();
        // The limit before the steps, as the guide writes it.
        let flow =
            create::<u32>("account").concurrency_per_key(1).step("work", |_| async { Ok(()) });
        let ok = flow.run_with(1, RunOptions::new().concurrency_key("k")).await.unwrap();
        assert_eq!(ok.status, RunStatus::Completed);
        let long = "x".repeat(orchestrix_coordinator::MAX_KEY_LEN + 1);
        for opts in [
            RunOptions::new().concurrency_key(""),
            RunOptions::new().concurrency_key(long.clone()),
            RunOptions::new().key(""),
            RunOptions::new().key(long.clone()),
        ] {
            let err = flow.run_with(1, opts.clone()).await.unwrap_err();
            assert!(err.to_string().starts_with("invalid run option: the "), "{opts:?}: {err}");
        }
        let err = one_step(&j).concurrency_per_key(0).run(1).await.unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    });
}
