//! The Rust reference worker of the conformance flow.
//!
//! Reads `NATS_URL`, `ORCHESTRIX_PREFIX`, `CONFORMANCE_EFFECTS` (the file it
//! appends one JSON line to per handler event) and `CONFORMANCE_WORKER_NAME`,
//! serves flow `conformance` (registering its definition), prints
//! `ready <worker id> <flow> <version>` once it serves, and drains on
//! SIGTERM / ctrl-c.

use std::io::Write;
use std::process::ExitCode;

use orchestrix::prelude::*;
use orchestrix_conformance::flow::{EffectLog, FLOW, conformance_flow};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> ExitCode {
    let nats = env("NATS_URL", "nats://127.0.0.1:4222");
    let prefix = env("ORCHESTRIX_PREFIX", "orchestrix");
    let name = env("CONFORMANCE_WORKER_NAME", "rust");
    let effects = std::env::var_os("CONFORMANCE_EFFECTS").map(std::path::PathBuf::from);
    let flow = conformance_flow(EffectLog::new(effects, &name));
    let version = flow.definition().version();
    let worker = match Worker::builder()
        .nats(NatsOptions::new(nats))
        .prefix(&prefix)
        .flow(flow)
        .start()
        .await
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {} {FLOW} {version}", worker.id());
        let _ = out.flush();
    }
    worker.run_until_signal().await;
    ExitCode::SUCCESS
}
