//! The kit against the Rust reference worker: every scenario passes.
//!
//! Needs `NATS_SERVER_BIN` (or `nats-server` on the PATH; `scripts/test.sh
//! --install-only` installs one) and the `orchestrix` binary built next to
//! the kit (`cargo build -p orchestrix-coordinator --bin orchestrix`), or
//! `ORCHESTRIX_BIN`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_rust_reference_worker_passes_every_scenario() {
    let kit = PathBuf::from(env!("CARGO_BIN_EXE_orchestrix-conformance"));
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_conformance-worker"));
    let next_to_kit = kit.parent().unwrap().join("orchestrix");
    assert!(
        std::env::var_os("ORCHESTRIX_BIN").is_some() || next_to_kit.is_file(),
        "{} is not built: cargo build -p orchestrix-coordinator --bin orchestrix (or set ORCHESTRIX_BIN)",
        next_to_kit.display()
    );
    let out = Command::new(&kit)
        .arg("--worker")
        .arg(format!("'{}'", worker.display()))
        .args(["--worker-name", "rust", "--json"])
        .output()
        .expect("the kit runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some_and(|c| c != 2), "the kit could not run: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("the kit's --json output does not parse ({e}): {stdout}; {stderr}")
    });
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 11, "{report:#}");
    let failed: Vec<String> = scenarios
        .iter()
        .filter(|s| s["passed"] != serde_json::Value::Bool(true))
        .map(|s| format!("{} {}: {}", s["number"], s["name"], s["reason"]))
        .collect();
    assert!(failed.is_empty(), "scenarios failed:\n{}", failed.join("\n"));
    assert!(out.status.success(), "all passed, yet exit status {:?}", out.status);
    assert!(report["version"].as_str().is_some_and(|v| v.len() == 16), "{report:#}");
}

#[test]
fn an_unknown_scenario_is_refused_before_anything_starts() {
    let kit = PathBuf::from(env!("CARGO_BIN_EXE_orchestrix-conformance"));
    let out = Command::new(&kit)
        .args(["--worker", "true", "--only", "no-such-scenario"])
        .output()
        .expect("the kit runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no scenario \"no-such-scenario\""), "{stderr}");
}

#[test]
fn a_worker_that_never_gets_ready_is_reported_with_its_stderr() {
    let kit = PathBuf::from(env!("CARGO_BIN_EXE_orchestrix-conformance"));
    let out = Command::new(&kit)
        .args(["--worker", "echo starting; echo oops >&2; exit 3", "--only", "success"])
        .output()
        .expect("the kit runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not become ready") && stderr.contains("it exited"), "{stderr}");
    assert!(stderr.contains("oops"), "the worker's stderr is shown: {stderr}");
}

/// The Rust flow makes the version the golden vector pins, the one every
/// SDK's conformance worker must make too.
#[test]
fn the_reference_flow_has_the_pinned_version() {
    let flow = orchestrix_conformance::flow::conformance_flow(
        orchestrix_conformance::flow::EffectLog::new(None, "test"),
    );
    let vector = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../proto/tests/vectors/flow-conformance.json"),
    )
    .unwrap();
    let vector: serde_json::Value = serde_json::from_str(&vector).unwrap();
    assert_eq!(Some(&*flow.definition().version()), vector["version"].as_str());
}
