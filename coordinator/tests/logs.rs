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
