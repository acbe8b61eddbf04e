//! Parallel groups on the embedded engine, in paused time: members start
//! together, the flow goes on once all completed, a member failing stops
//! its siblings, and rollback is reverse between stages and concurrent
//! inside a group.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Journal, paused};
use futures::future::BoxFuture;
use orchestrix_coordinator::{Flow, RunStatus, StepOptions, StepStatus, create};
use orchestrix_worker::{StepContext, StepError};

const MS: Duration = Duration::from_millis(1);

/// A step that logs `run NAME`, sleeps `ms`, then logs `done NAME` and
/// returns `out` (or fails for good when `fails`); its compensation logs
/// `undo NAME`, sleeps `undo_ms`, then logs `undone NAME`.
#[derive(Clone, Copy)]
struct S {
    name: &'static str,
    ms: u32,
    out: u32,
    fails: bool,
    undo_ms: u32,
}

fn s(name: &'static str, ms: u32, out: u32) -> S {
    S { name, ms, out, fails: false, undo_ms: 10 }
}

type Handler =
    Box<dyn Fn(StepContext<()>) -> BoxFuture<'static, Result<u32, StepError>> + Send + Sync>;

/// The step's handler and its options (with the compensation).
fn handlers(j: &Journal, st: S) -> (Handler, impl FnOnce(StepOptions<()>) -> StepOptions<()>) {
    let (run, undo) = (j.clone(), j.clone());
    let exec: Handler = Box::new(move |_| {
        let run = run.clone();
        Box::pin(async move {
            run.log(format!("run {}", st.name));
            tokio::time::sleep(MS * st.ms).await;
            run.log(format!("done {}", st.name));
            if st.fails {
                return Err(StepError::permanent(format!("{} broke", st.name)));
            }
            Ok(st.out)
        })
    });
    let options = move |o: StepOptions<()>| {
        o.compensate(move |_ctx| {
            let undo = undo.clone();
            async move {
                undo.log(format!("undo {}", st.name));
                tokio::time::sleep(MS * st.undo_ms).await;
                undo.log(format!("undone {}", st.name));
                Ok(())
            }
        })
    };
    (exec, options)
}

fn add(flow: Flow<()>, j: &Journal, st: S) -> Flow<()> {
    let (exec, options) = handlers(j, st);
    flow.step_with(st.name, exec, options)
}

fn group(flow: Flow<()>, j: &Journal, name: &str, steps: &[S]) -> Flow<()> {
    let (j, steps) = (j.clone(), steps.to_vec());
    flow.parallel(name, move |mut g| {
        for st in steps {
            let (exec, options) = handlers(&j, st);
            g = g.step_with(st.name, exec, options);
        }
        g
    })
}

fn at(j: &Journal, what: &str) -> Duration {
    *j.times_of(what)
        .first()
        .unwrap_or_else(|| panic!("`{what}` never happened: {:?}", j.entries()))
}

#[test]
fn a_group_runs_at_once_and_the_next_step_waits_for_all_of_it() {
    paused(|| async {
        let j = Journal::new();
        let flow = add(create::<()>("order"), &j, s("check", 10, 0));
        let flow = group(flow, &j, "reserve", &[s("wh-a", 100, 1), s("wh-b", 300, 2)]);
        let j2 = j.clone();
        let flow = flow.step("ship", move |ctx| {
            let j = j2.clone();
            async move {
                j.log("run ship");
                let (a, b): (u32, u32) = (ctx.output("wh-a")?, ctx.output("wh-b")?);
                Ok(a + b)
            }
        });
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        // Both members start when `check` is done, together.
        assert_eq!(at(&j, "run wh-a"), at(&j, "done check"));
        assert_eq!(at(&j, "run wh-b"), at(&j, "done check"));
        // `ship` starts once the slower member is done, and sees both outputs.
        assert_eq!(at(&j, "run ship"), at(&j, "done wh-b"));
        common::assert_ms(at(&j, "run ship") - at(&j, "run wh-a"), MS * 300);
        assert_eq!(
            report.step("ship").unwrap().output.as_ref().unwrap().decode::<u32>().unwrap(),
            3
        );
        let groups: Vec<_> = report.steps.iter().map(|s| s.group.as_deref()).collect();
        assert_eq!(groups, [None, Some("reserve"), Some("reserve"), None]);
        assert!(report.to_string().contains("wh-a [group reserve]: completed"), "{report}");
    });
}

#[test]
fn a_member_failing_stops_the_others_and_the_group_is_undone_together() {
    paused(|| async {
        let j = Journal::new();
        let flow = add(create::<()>("order"), &j, s("check", 10, 0));
        let broken = S { fails: true, ..s("card", 50, 0) };
        let slow = S { undo_ms: 40, ..s("wh-slow", 1000, 0) };
        let flow = group(flow, &j, "reserve", &[s("wh-fast", 10, 0), broken, slow]);
        let flow = add(flow, &j, s("ship", 10, 0));
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        assert_eq!(report.failed_step.as_deref(), Some("card"));
        // The slow member was stopped in mid-handler: it never finished.
        assert!(j.times_of("done wh-slow").is_empty(), "{:?}", j.entries());
        // The group's completed and maybe-done members are undone together,
        // when the failure is known; then the step before the group.
        assert_eq!(at(&j, "undo wh-fast"), at(&j, "done card"));
        assert_eq!(at(&j, "undo wh-slow"), at(&j, "done card"));
        assert_eq!(at(&j, "undo check"), at(&j, "undone wh-slow"));
        assert!(j.times_of("run ship").is_empty());
        let status = |n: &str| report.step(n).unwrap().status;
        assert_eq!(status("card"), StepStatus::Failed);
        assert_eq!(status("wh-fast"), StepStatus::Compensated);
        assert_eq!(
            status("wh-slow"),
            StepStatus::Compensated,
            "stopped in hand: maybe done, undone"
        );
        assert_eq!(status("check"), StepStatus::Compensated);
        assert_eq!(status("ship"), StepStatus::NotRun);
    });
}

#[test]
fn rollback_across_three_groups_is_reverse_between_and_concurrent_within() {
    paused(|| async {
        let j = Journal::new();
        let undo = |name, undo_ms| S { undo_ms, ..s(name, 10, 0) };
        let flow = group(create::<()>("big"), &j, "g1", &[undo("a1", 30), undo("a2", 10)]);
        let flow = group(flow, &j, "g2", &[undo("b1", 10), undo("b2", 50), undo("b3", 20)]);
        let flow = group(flow, &j, "g3", &[undo("c1", 20), undo("c2", 40)]);
        let flow = add(flow, &j, S { fails: true, ..s("last", 10, 0) });
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        let stages: [&[&str]; 3] = [&["c1", "c2"], &["b1", "b2", "b3"], &["a1", "a2"]];
        for stage in stages {
            // Concurrent inside a group: its members begin at one instant.
            let first = at(&j, &format!("undo {}", stage[0]));
            for m in stage {
                assert_eq!(at(&j, &format!("undo {m}")), first, "{:?}", j.entries());
            }
        }
        // Reverse between groups: each group's compensations all end before
        // any of the group before it begins (a partial order, checked pairwise).
        for pair in stages.windows(2) {
            for later in pair[0] {
                for earlier in pair[1] {
                    assert!(
                        at(&j, &format!("undone {later}")) <= at(&j, &format!("undo {earlier}")),
                        "{later} must be undone before {earlier} starts: {:?}",
                        j.entries()
                    );
                }
            }
        }
        // The slowest member of a group sets when the next group starts.
        assert_eq!(at(&j, "undo b1"), at(&j, "undone c2"));
        assert_eq!(at(&j, "undo a1"), at(&j, "undone b2"));
    });
}

#[test]
fn a_group_with_no_steps_or_split_in_two_is_refused() {
    paused(|| async {
        let flow = create::<()>("f").parallel("g", |g| g);
        let err = flow.run(()).await.unwrap_err();
        assert!(err.to_string().contains("parallel group `g` has no steps"), "{err}");
        let j = Journal::new();
        let flow = group(create::<()>("f"), &j, "g", &[s("a", 1, 0)]);
        let flow = add(flow, &j, s("b", 1, 0));
        let flow = group(flow, &j, "g", &[s("c", 1, 0)]);
        let err = flow.run(()).await.unwrap_err();
        assert!(err.to_string().contains("next to each other"), "{err}");
    });
}

#[test]
fn the_deadline_in_a_group_stops_every_member_and_undoes_them_all() {
    paused(|| async {
        let j = Journal::new();
        let slow = |name| S { undo_ms: 10, ..s(name, 2000, 0) };
        let flow = add(create::<()>("f"), &j, s("first", 10, 0));
        let flow = group(flow, &j, "g", &[s("fast", 10, 0), slow("s1"), slow("s2")]);
        let opts = orchestrix_coordinator::RunOptions::new().timeout(MS * 200);
        let report = flow.run_with((), opts).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        // Both slow members were running: both may have acted, both undone.
        for name in ["fast", "s1", "s2", "first"] {
            assert_eq!(report.step(name).unwrap().status, StepStatus::Compensated, "{report}");
            assert_eq!(j.times_of(&format!("undo {name}")).len(), 1, "{name}");
        }
    });
}

#[test]
fn one_name_twice_in_a_row_is_refused() {
    paused(|| async {
        let j = Journal::new();
        let flow = group(create::<()>("f"), &j, "g", &[s("a", 1, 0)]);
        let flow = group(flow, &j, "g", &[s("b", 1, 0)]);
        let err = flow.run(()).await.unwrap_err();
        assert!(err.to_string().contains("follows a group of the same name"), "{err}");
    });
}
