//! Worker processes that die, freeze or are told to stop, mid-step.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{FlowDef, Hooks, RunOptions, RunStatus, StepEvent};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::{ChildProcess, NatsServer};
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);

const CRASH_FLOW: &str = r#"
[[flow]]
name = "crash"
[[flow.step]]
name = "a"
compensable = true
[[flow.step]]
name = "b"
retries = 3
retry_delay_ms = 50
# Idempotent: an attempt whose worker died or froze is simply run again.
on_unknown = "retry"
"#;

/// A coordinator node serving `flows` from memory (no registry, no run events).
async fn node_with(
    server: &NatsServer,
    options: NatsBusOptions,
    flows: Vec<FlowDef>,
    hooks: Option<Retries>,
) -> Node {
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let mut b = Node::builder()
        .bus_options(options)
        .store(NodeStore::Memory)
        .flows(flows)
        .registry(false)
        .events(false);
    if let Some(h) = hooks {
        b = b.hooks(h);
    }
    b.start(nats).await.unwrap()
}

async fn coordinator(server: &NatsServer, silence: Duration) -> Node {
    let options = NatsBusOptions::default().ack_timeout(5 * SECS).heartbeat_timeout(silence);
    node_with(server, options, flowfile::parse(CRASH_FLOW).unwrap(), None).await
}

fn test_worker() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_test_worker"))
}

async fn spawn_worker(server: &NatsServer, delay_ms: u64) -> ChildProcess {
    let url = server.url();
    let delay = delay_ms.to_string();
    let w = ChildProcess::spawn(
        &test_worker(),
        &["--nats", &url, "--delay-ms", &delay, "--heartbeat-ms", "100"],
    );
    w.wait_for_line("ready", 10 * SECS).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_is_replaced_by_another_replica() {
    let server = NatsServer::start();
    let node = coordinator(&server, Duration::from_millis(600)).await;
    let c = node.coordinator();
    let doomed = spawn_worker(&server, 60_000).await;
    let run = c.start("crash", &5u32, RunOptions::new()).await.unwrap();
    let started = doomed.wait_for_line("b-start", 10 * SECS).await;
    assert!(started.ends_with(" 1"), "{started}");
    // A replica comes up; the first one dies with the command in hand.
    let survivor = spawn_worker(&server, 0).await;
    doomed.signal("KILL");
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let b = report.step("b").unwrap();
    assert_eq!(b.attempts, 2);
    assert!(b.error.as_deref().unwrap().contains("went silent"), "{:?}", b.error);
    // Step a ran once (in the doomed worker); b finished in the survivor.
    assert_eq!(doomed.lines_starting("a ").len(), 1);
    assert!(survivor.lines_starting("a ").is_empty());
    // The outcome can reach the coordinator before the line reaches us
    // through the pipe: wait for it, then count.
    survivor.wait_for_line("b-done", 5 * SECS).await;
    assert_eq!(survivor.lines_starting("b-done").len(), 1);
    assert!(doomed.lines_starting("b-done").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_went_quiet_is_asked_before_its_step_is_given_up() {
    // The coordinator's patience (600 ms) is shorter than the worker's
    // heartbeat interval (5 s): every silence is a false alarm, as when a
    // worker's heartbeats or outcome were lost while its connection moved to
    // another node. Asked, the worker answers, and the attempt stands.
    let server = NatsServer::start();
    let node = coordinator(&server, Duration::from_millis(600)).await;
    let c = node.coordinator();
    let url = server.url();
    let args = ["--nats", url.as_str(), "--delay-ms", "2000", "--heartbeat-ms", "5000"];
    let quiet = ChildProcess::spawn(&test_worker(), &args);
    quiet.wait_for_line("ready", 10 * SECS).await;
    let run = c.start("crash", &5u32, RunOptions::new()).await.unwrap();
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let b = report.step("b").unwrap();
    assert_eq!((b.attempts, b.error.as_deref()), (1, None), "{report}");
    assert_eq!(quiet.lines_starting("b-start").len(), 1);
    quiet.wait_for_line("b-done", 5 * SECS).await;
    assert_eq!(quiet.lines_starting("b-done").len(), 1);
}

#[derive(Clone, Default)]
struct Retries(Arc<Mutex<Vec<String>>>);

impl Hooks for Retries {
    fn on_step_retry(&self, e: &StepEvent<'_>, error: &str, _delay: Duration) {
        self.0.lock().unwrap().push(format!("{} #{}: {error}", e.step, e.attempt));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_given_up_after_its_heartbeats_stop() {
    // A frozen process keeps its connection, and so its place in the queue
    // group, until the server finds it stale: short pings make that quick.
    let server = NatsServer::start_with_config("ping_interval: \"250ms\"\nping_max: 2\n");
    let options =
        NatsBusOptions::default().ack_timeout(SECS).heartbeat_timeout(Duration::from_millis(600));
    let retries = Retries::default();
    let mut flows = flowfile::parse(CRASH_FLOW).unwrap();
    for def in &mut flows {
        def.steps[1].retry.retries = 10;
    }
    let node = node_with(&server, options, flows, Some(retries.clone())).await;
    let c = node.coordinator();
    let frozen = spawn_worker(&server, 2_000).await;
    let run = c.start("crash", &5u32, RunOptions::new()).await.unwrap();
    frozen.wait_for_line("b-start", 10 * SECS).await;
    let healthy = spawn_worker(&server, 0).await;
    frozen.signal("STOP");
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    // The first attempt was given up for silence; a later one found the healthy replica.
    let seen = retries.0.lock().unwrap().clone();
    assert!(
        seen[0].starts_with("b #1: outcome unknown: worker ")
            && seen[0].ends_with(
                "went silent: no heartbeat for 600ms, and no worker answered when asked"
            ),
        "{seen:?}"
    );
    assert_eq!(report.step("b").unwrap().attempts as usize, seen.len() + 1);
    healthy.wait_for_line("b-done", 5 * SECS).await;
    assert_eq!(healthy.lines_starting("b-done").len(), 1);
    assert_eq!(frozen.lines_starting("b-start").len(), 1, "the frozen worker took nothing more");
    // Thawed, the old worker is gone from NATS; the run's report stands.
    frozen.signal("CONT");
    assert_eq!(c.status(report.run_id).await.unwrap().unwrap(), report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_worker_after_the_step_in_hand() {
    let server = NatsServer::start();
    let node = coordinator(&server, 5 * SECS).await;
    let c = node.coordinator();
    let mut w = spawn_worker(&server, 700).await;
    let run = c.start("crash", &5u32, RunOptions::new()).await.unwrap();
    w.wait_for_line("b-start", 10 * SECS).await;
    w.signal("TERM");
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(
        report.step("b").unwrap().attempts,
        1,
        "the step in hand finished, nothing was retried"
    );
    assert_eq!(w.wait(10 * SECS).await, Some(0));
    let lines = w.lines();
    assert_eq!(lines.last().map(String::as_str), Some("drained"), "{lines:?}");
    // A drained worker takes nothing more: the next run finds no worker.
    let options = NatsBusOptions::default()
        .ack_timeout(Duration::from_millis(200))
        .clock_skew(Duration::from_millis(50))
        .worker_wait(SECS);
    let quick = node_with(&server, options, flowfile::parse(CRASH_FLOW).unwrap(), None).await;
    let report = quick.coordinator().run("crash", &1u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.clone().unwrap();
    assert!(error.starts_with("no worker took the command in 1"), "{error}");
    assert_eq!(report.step("a").unwrap().attempts, 1, "waiting spends no attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_nats_still_shuts_down_in_bounded_time() {
    let mut server = NatsServer::start();
    let node = coordinator(&server, 5 * SECS).await;
    let c = node.coordinator();
    let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let e = entered.clone();
    let w = orchestrix::Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .drain_timeout(Duration::from_millis(500))
        .steps::<u32>("crash", move |f| {
            let e = e.clone();
            f.step("a", |_: orchestrix::StepContext<u32>| async { Ok(()) }).step("b", move |_| {
                e.store(true, std::sync::atomic::Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(())
                }
            })
        })
        .start()
        .await
        .unwrap();
    let _run = c.start("crash", &1u32, RunOptions::new()).await.unwrap();
    orchestrix_integration_tests::eventually(10 * SECS, "step b running", || {
        entered.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    server.kill();
    let started = std::time::Instant::now();
    w.shutdown().await;
    assert!(started.elapsed() < 5 * SECS, "shutdown took {:?}", started.elapsed());
}
