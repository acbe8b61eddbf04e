//! Operating runs over NATS (cancel, resume) against a real `nats-server`,
//! with real workers holding the steps operated on.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, StepStatus, Worker, create};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_integration_tests::{Ledger, NatsServer, eventually, workers_registered};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

async fn node(server: &NatsServer) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let bus = NatsBusOptions::default().ack_timeout(500 * MS).heartbeat_timeout(2 * SECS);
    Node::builder().bus_options(bus).takeover_every(500 * MS).start(conn).await.unwrap()
}

/// A run of `flow` started as soon as a coordinator serves it (the
/// worker's registration takes a moment to reach them).
async fn run_once_served(c: &Client, flow: &str) -> orchestrix::RunReport {
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    loop {
        match c.run(flow, &1u32, RunOptions::new()).await {
            Ok(r) => return r,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(100 * MS).await;
    }
}

async fn cli(url: &str, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(orchestrix_integration_tests::built("orchestrix"))
        .args(["--nats", url])
        .args(args)
        .output();
    tokio::time::timeout(30 * SECS, out).await.unwrap().unwrap()
}

async fn client(server: &NatsServer) -> Client {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Client::new(conn, Subjects::default()).request_timeout(3 * SECS)
}

/// `a`, `b` complete; `c` holds until cancelled. Logs `{what} {step} {run}`.
fn shop(ledger: &Ledger) -> orchestrix::Flow<u32> {
    let mut flow = create::<u32>("shop");
    for step in ["a", "b", "c"] {
        let (run, undo) = (ledger.clone(), ledger.clone());
        flow = flow.step_with(
            step,
            move |ctx: StepContext<u32>| {
                let run = run.clone();
                async move {
                    run.log(format!("run {} {}", ctx.step(), ctx.run_id()));
                    if ctx.step() == "c" {
                        struct Dropped(Ledger, String);
                        impl Drop for Dropped {
                            fn drop(&mut self) {
                                self.0.log(format!("dropped c {}", self.1));
                            }
                        }
                        let _guard = Dropped(run.clone(), ctx.run_id().to_string());
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            },
            move |o| {
                o.compensate(move |ctx| {
                    let undo = undo.clone();
                    async move {
                        undo.log(format!("undo {} {}", ctx.step(), ctx.run_id()));
                        Ok(())
                    }
                })
            },
        );
    }
    flow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_workers_handler_and_rolls_back_in_reverse() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let flow = shop(&ledger);
    let version = flow.definition().version();
    // Two replicas: the cancel reaches whichever holds the step.
    let w1 = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow(flow.clone())
        .start()
        .await
        .unwrap();
    let w2 =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap();
    workers_registered(node.coordinator(), &version, 2).await;
    let c = client(&server).await;
    let id = c.start("shop", &1u32, RunOptions::new()).await.unwrap();
    eventually(10 * SECS, "step c to start", || ledger.count(&format!("run c {id}")) == 1).await;

    // From the command line, as an operator does.
    let id_text = id.to_string();
    let args =
        ["cancel", id_text.as_str(), "--reason", "customer asked", "--by", "ops@test", "--wait"];
    let out = cli(&server.url(), &args).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Said once: the run's error line, not again as an action.
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("by ops@test: customer asked").count(), 1, "{out:?}");
    assert!(text.contains("cancelled by ops@test: customer asked"), "{out:?}");
    let report = tokio::time::timeout(30 * SECS, c.wait(id)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Cancelled, "{report}");
    // `c` was started by a worker: it may have acted, so it is compensated too.
    let statuses: Vec<_> = report.steps.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [StepStatus::Compensated; 3], "{report}");
    let undo: Vec<String> = ["c", "b", "a"].iter().map(|s| format!("undo {s} {id}")).collect();
    let log: Vec<String> = ledger.about(id).into_iter().filter(|l| l.starts_with("undo")).collect();
    assert_eq!(log, undo, "reverse order");
    eventually(5 * SECS, "the worker to drop the handler", || {
        ledger.count(&format!("dropped c {id}")) == 1
    })
    .await;
    assert_eq!(report.actions[0].by, "ops@test");
    assert_eq!(report.actions[0].reason.as_deref(), Some("customer asked"));

    // Again: harmless. A finished run that completed: refused. Unknown: refused.
    c.cancel(id, "ops@test", None).await.unwrap();
    let done = create::<u32>("quick").step("x", |_ctx| async { Ok(()) });
    let w3 =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(done).start().await.unwrap();
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    let finished = loop {
        match c.run("quick", &1u32, RunOptions::new()).await {
            Ok(r) => break r,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(100 * MS).await;
    };
    let err = c.cancel(finished.run_id, "ops", None).await.unwrap_err();
    assert!(err.to_string().contains("already finished: completed"), "{err}");
    let err = c.cancel(uuid::Uuid::now_v7().into(), "ops", None).await.unwrap_err();
    assert!(err.to_string().contains("unknown run"), "{err}");
    for w in [w1, w2, w3] {
        w.shutdown().await;
    }
}

/// A flow whose first step, `reserve`, logs `reserve {run}` and is undone
/// by `release {run}`.
fn reserving(name: &str, ledger: &Ledger) -> orchestrix::Flow<u32> {
    let (run, undo) = (ledger.clone(), ledger.clone());
    create::<u32>(name).step_with(
        "reserve",
        move |ctx: StepContext<u32>| {
            run.log(format!("reserve {}", ctx.run_id()));
            async { Ok(()) }
        },
        move |o| {
            o.compensate(move |ctx| {
                undo.log(format!("release {}", ctx.run_id()));
                async { Ok(()) }
            })
        },
    )
}

/// `pay`: `reserve` (compensable), then `charge`, which fails while the
/// dependency is down and pauses the run when its one retry is spent.
fn pay(
    ledger: &Ledger,
    down: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> orchestrix::Flow<u32> {
    let l3 = ledger.clone();
    let down = down.clone();
    reserving("pay", ledger).step_with(
        "charge",
        move |ctx| {
            let down = down.load(std::sync::atomic::Ordering::SeqCst);
            l3.log(format!("charge {} {}", if down { "failed" } else { "ok" }, ctx.run_id()));
            async move {
                if down {
                    return Err(orchestrix::StepError::retryable("payment provider unreachable"));
                }
                Ok(())
            }
        },
        |o| o.retries(1).retry_delay(50 * MS).pause_when_exhausted(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_run_survives_its_coordinator_and_is_resumed_from_the_cli() {
    use orchestrix_integration_tests::{ChildProcess, built};
    let server = NatsServer::start();
    let url = server.url();
    let coordinator = || ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let orchestrix = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new(built("orchestrix"))
                .args(["--nats", url.as_str()])
                .args(&args)
                .output();
            tokio::time::timeout(30 * SECS, out).await.unwrap().unwrap()
        }
    };
    let mut first = coordinator();
    let ledger = Ledger::default();
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let worker = Worker::builder()
        .nats(NatsOptions::new(url.clone()))
        .flow(pay(&ledger, &down))
        .start()
        .await
        .unwrap();
    let c = client(&server).await;
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    let id = loop {
        match c.start("pay", &1u32, RunOptions::new()).await {
            Ok(id) => break id,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(100 * MS).await;
    };
    // Out of retries: paused, visibly, with the step, its attempts and error.
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    let paused = loop {
        let r = c.status(id).await.unwrap();
        if r.status == RunStatus::Paused {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "never paused: {r}");
        tokio::time::sleep(50 * MS).await;
    };
    let pause = paused.paused.as_ref().unwrap();
    assert_eq!(
        (pause.step.as_str(), pause.kind.as_str(), pause.until),
        ("charge", "execute", None)
    );
    assert!(paused.to_string().contains("paused at charge (execute) for"), "{paused}");
    let charge = paused.step("charge").unwrap();
    assert_eq!((charge.status, charge.attempts), (StepStatus::Paused, 2), "{paused}");
    assert_eq!(charge.error.as_deref(), Some("payment provider unreachable"));
    let listed =
        c.list(orchestrix::ListFilter::new(Some(RunStatus::Paused), None, 10)).await.unwrap();
    assert_eq!(listed.iter().map(|r| r.run_id).collect::<Vec<_>>(), [id]);
    // Resume is refused for a run that is not paused; rollback too.
    let bad = orchestrix(vec!["resume".into(), uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    // The coordinator dies; another takes the paused run over, still paused.
    first.signal("KILL");
    let _ = first.wait(10 * SECS).await;
    let _second = coordinator();
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let o =
            orchestrix(vec!["resume".into(), id.to_string(), "--by".into(), "oncall".into()]).await;
        if o.status.code() == Some(0) {
            assert!(String::from_utf8_lossy(&o.stdout).contains("resume of run"), "{o:?}");
            break;
        }
        // Not yet taken over: no coordinator holds it live.
        assert!(tokio::time::Instant::now() < deadline, "never resumed: {o:?}");
        if let Ok(r) = c.status(id).await {
            assert_eq!(r.status, RunStatus::Paused, "{r}");
        }
        tokio::time::sleep(200 * MS).await;
    }
    let report = tokio::time::timeout(30 * SECS, c.wait(id)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(report.step("charge").unwrap().attempts, 3);
    assert_eq!(ledger.count(&format!("charge ok {id}")), 1);
    assert_eq!(ledger.count(&format!("reserve {id}")), 1, "the completed step never ran again");
    assert_eq!(ledger.count(&format!("release {id}")), 0);
    assert_eq!(report.actions.len(), 1);
    assert_eq!(report.actions[0].by, "oncall");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollback_is_resumed_and_never_reruns_a_compensation_that_succeeded() {
    use std::sync::atomic::AtomicBool;
    let server = NatsServer::start();
    let _node = node(&server).await;
    let ledger = Ledger::default();
    let refunds_down = Arc::new(AtomicBool::new(true));
    let (l3, l4, l5) = (ledger.clone(), ledger.clone(), ledger.clone());
    let down = refunds_down.clone();
    let flow = reserving("refund", &ledger)
        .step_with(
            "charge",
            move |ctx| {
                l3.log(format!("charge {}", ctx.run_id()));
                async { Ok(()) }
            },
            move |o| {
                o.compensation_retry(orchestrix::RetryPolicy::new()).compensate(move |ctx| {
                    let down = down.load(Ordering::SeqCst);
                    l4.log(format!(
                        "refund {} {}",
                        if down { "failed" } else { "ok" },
                        ctx.run_id()
                    ));
                    async move {
                        if down {
                            return Err(orchestrix::StepError::retryable("refund API down"));
                        }
                        Ok(())
                    }
                })
            },
        )
        .step("ship", move |ctx| {
            l5.log(format!("ship {}", ctx.run_id()));
            async { Err::<(), _>(orchestrix::StepError::permanent("address invalid")) }
        });
    let worker =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap();
    let c = client(&server).await;
    let report = run_once_served(&c, "refund").await;
    let id = report.run_id;
    assert_eq!(report.status, RunStatus::CompensationFailed, "{report}");
    assert_eq!(report.step("charge").unwrap().status, StepStatus::CompensationFailed);
    assert_eq!(report.step("reserve").unwrap().status, StepStatus::Compensated);

    // Fixed; the rollback is resumed (by the client here; the CLI is the same call).
    refunds_down.store(false, Ordering::SeqCst);
    c.resume(id, "oncall").await.unwrap();
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    let report = loop {
        let r = c.status(id).await.unwrap();
        if r.status.is_terminal() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(50 * MS).await;
    };
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(report.step("charge").unwrap().status, StepStatus::Compensated);
    assert_eq!(report.step("charge").unwrap().compensation.as_ref().unwrap().attempts, 2);
    assert_eq!(ledger.count(&format!("refund ok {id}")), 1);
    assert_eq!(ledger.count(&format!("release {id}")), 1, "never run again");
    assert_eq!(ledger.count(&format!("ship {id}")), 1);
    assert_eq!(report.actions.iter().map(|a| a.by.as_str()).collect::<Vec<_>>(), ["oncall"]);
    // Finished as failed now: nothing left to resume.
    let err = c.resume(id, "oncall").await.unwrap_err();
    assert!(err.to_string().contains("already finished: failed"), "{err}");
    worker.shutdown().await;
}

/// A resumed failed rollback reads as live while it runs, on every
/// coordinator and through a client: its old history entry (the end it
/// had) does not hide it; the JetStream store keeps both until the run
/// ends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_rollback_does_not_read_as_its_old_end() {
    let server = NatsServer::start();
    let n1 = node(&server).await;
    let n2 = node(&server).await;
    // 0: refund fails; 1: refund takes 8 s then succeeds.
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let flow = create::<u32>("refund")
        .step_with(
            "charge",
            |_: StepContext<u32>| async { Ok(()) },
            move |o| {
                o.compensation_retry(orchestrix::RetryPolicy::new()).compensate(move |_ctx| {
                    let mode = m.load(Ordering::SeqCst);
                    async move {
                        if mode == 0 {
                            return Err(orchestrix::StepError::retryable("refund API down"));
                        }
                        tokio::time::sleep(8 * SECS).await;
                        Ok(())
                    }
                })
            },
        )
        .step("ship", |_| async { Err::<(), _>(orchestrix::StepError::permanent("no")) });
    let worker =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap();
    let c = client(&server).await;
    let report = run_once_served(&c, "refund").await;
    let id = report.run_id;
    assert_eq!(report.status, RunStatus::CompensationFailed, "{report}");
    mode.store(1, Ordering::SeqCst);
    c.resume(id, "oncall").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..25 {
        let a = n1.coordinator().status(id).await.unwrap().map(|r| r.status);
        let b = n2.coordinator().status(id).await.unwrap().map(|r| r.status);
        let l = c.status(id).await.map(|r| r.status).ok();
        seen.push((a, b, l));
        tokio::time::sleep(250 * MS).await;
    }
    // Once the resumed run's record is checkpointed (a second or two),
    // every reader must see it live; the rollback runs 8 s.
    let stale: Vec<_> = seen[12..]
        .iter()
        .filter(|(a, b, l)| [a, b, l].iter().any(|s| **s == Some(RunStatus::CompensationFailed)))
        .collect();
    worker.shutdown().await;
    assert!(stale.is_empty(), "old end read while the resumed rollback runs: {seen:?}");
}
