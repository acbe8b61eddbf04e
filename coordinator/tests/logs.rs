//! What the stderr logs (installed by `orchestrix_worker::telemetry::init_with`)
//! show of a run's retries, failed attempts and unknown outcomes, with and
//! without an OpenTelemetry export: every such line names its run.
//!
//! Each check runs its scenario in a child process (a global subscriber can be
//! installed once per process) and reads the child's stderr.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{RunStatus, create};
use orchestrix_worker::StepError;

/// Runs the scenario test `name` in a child process; its stderr.
fn child(name: &str, export: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("LOGS_CHILD", export)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "child failed:\n{err}");
    err
}

/// The scenario: a step retried then failed for good, and a step whose
/// outcome is unknown (its handler outlives its timeout).
async fn scenario() {
    let declined = create::<()>("payment-flow")
        .step_with("reserve-stock", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
        .step_with(
            "process-payment",
            |_| async { Err::<(), _>(StepError::retryable("declined")) },
            |o| o.retries(1).retry_delay(Duration::from_millis(10)),
        );
    let report = declined.run(()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    eprintln!("SEEN declined run_id={}", report.run_id);

    let unknown = common::payment_that_times_out("slow-flow");
    let report = unknown.run(()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    eprintln!("SEEN unknown run_id={}", report.run_id);
}

#[test]
fn scenario_child() {
    let Some(mode) = std::env::var_os("LOGS_CHILD") else { return };
    let export = (mode == "otel").then(|| {
        // Spans exported somewhere that is not there: an OpenTelemetry layer
        // is installed, as in a deployment with OTLP export.
        orchestrix_worker::telemetry::Export::http("http://127.0.0.1:9").without_metrics()
    });
    let _guard = orchestrix_worker::telemetry::init_with("logs-test", "info", export);
    paused(scenario);
}

fn run_id(err: &str, which: &str) -> String {
    let tag = format!("SEEN {which} run_id=");
    err.lines().find_map(|l| l.strip_prefix(&tag)).unwrap().trim().to_owned()
}

/// Each line of a retry, a failed attempt and an unknown outcome names its run.
fn named(err: &str) {
    let unknown = run_id(err, "unknown");
    let declined = run_id(err, "declined");
    let line = err.lines().find(|l| l.contains("outcome unknown")).expect(err);
    assert!(line.contains(&unknown), "the warning does not name run {unknown}: {line}");
    assert!(line.contains("WARN"), "{line}");
    let line = err.lines().find(|l| l.contains("retry scheduled")).expect(err);
    assert!(line.contains(&declined), "the retry does not name run {declined}: {line}");
    let line = err.lines().find(|l| l.contains("attempt failed")).expect(err);
    assert!(line.contains(&declined) && line.contains("process-payment"), "{line}");
}

/// Logs only (no OTLP endpoint: the default), where the run actor makes no
/// spans: the lines are logged all the same.
#[test]
fn without_export_the_logs_show_retries_failures_and_unknown_outcomes() {
    named(&child("scenario_child", "logs"));
}

/// With export, where the run's spans are made (with the OpenTelemetry API)
/// and never prefix a log line.
#[test]
fn with_export_the_logs_name_the_run_of_each_line() {
    let err = child("scenario_child", "otel");
    named(&err);
}

/// A collector on a loopback port that keeps the body of every OTLP/HTTP
/// request it gets.
fn collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let (mut len, mut line) = (0, String::new());
                    while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        line.clear();
                    }
                    if line != "\r\n" {
                        return;
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    kept.lock().unwrap().extend_from_slice(&body);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    reader.get_mut().write_all(ok).unwrap();
                }
            });
        }
    });
    (url, bodies)
}

#[test]
fn export_child() {
    let Some(url) = std::env::var_os("EXPORT_CHILD") else { return };
    let export =
        orchestrix_worker::telemetry::Export::http(url.to_str().unwrap()).without_metrics();
    let guard = orchestrix_worker::telemetry::init_with("export-test", "warn", Some(export));
    paused(|| async {
        let flow = create::<()>("export-flow").step("charge", |_| async {
            // A handler's own info span and event, under a `warn` log level.
            tracing::info_span!("call the bank").in_scope(|| tracing::info!("the bank answered"));
            // A target the log's directives silence: out of the export too.
            tracing::info_span!(target: "chatty", "chatter").in_scope(|| ());
            Ok(())
        });
        assert_eq!(flow.run(()).await.unwrap().status, RunStatus::Completed);
    });
    drop(guard);
}

/// The log level decides what is logged, not what is exported: under
/// `RUST_LOG=warn` a handler's own info span is exported (with its event),
/// and nothing of it is logged. A target the directives turn off stays out
/// of both.
#[test]
fn spans_are_exported_whatever_the_log_level() {
    let (url, bodies) = collector();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["export_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("EXPORT_CHILD", &url)
        .env("RUST_LOG", "warn,chatty=off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{err}");
    assert!(!err.contains("the bank answered"), "an info line was logged at warn:\n{err}");
    let bodies = bodies.lock().unwrap();
    let has = |what: &str| bodies.windows(what.len()).any(|w| w == what.as_bytes());
    for what in
        ["export-flow run", "charge execute attempt 1", "call the bank", "the bank answered"]
    {
        assert!(has(what), "{what:?} was not exported ({} bytes)", bodies.len());
    }
    assert!(!has("chatter"), "a span of a target turned off was exported");
}

/// An idle child with its exports' delays set to 0: how many CPU ticks
/// (1/100 s) it spends in 3 s of doing nothing.
#[test]
fn idle_child() {
    let Some(url) = std::env::var_os("IDLE_CHILD") else { return };
    let export = orchestrix_worker::telemetry::Export::http(url.to_str().unwrap());
    let guard = orchestrix_worker::telemetry::init_with("idle-test", "warn", Some(export));
    let ticks = || {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = ticks();
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("IDLE TICKS {}", ticks() - before);
    drop(guard);
}

/// A schedule delay or an export interval of 0 (both read from the
/// standard variables) does not make an idle process spin: 0 reads as the
/// default. Taken literally, the export loops never wait, and an idle
/// process used most of a core.
#[test]
#[cfg(target_os = "linux")]
fn zero_export_delays_do_not_spin_an_idle_process() {
    let (url, _) = collector();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["idle_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("IDLE_CHILD", &url)
        .env("OTEL_BSP_SCHEDULE_DELAY", "0")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{err}");
    let ticks: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("IDLE TICKS "))
        .unwrap_or_else(|| panic!("no tick count:\n{err}"))
        .trim()
        .parse()
        .unwrap();
    // Idle is a tick or two; spinning was hundreds (dozens on a loaded machine).
    assert!(ticks < 30, "an idle process spent {ticks} ticks in 3 s");
}
