//! The quick start's flow, served by a worker process over NATS: the same
//! definition `payment_flow` runs embedded (`examples/shared/payment.rs`),
//! registered in the cluster when the worker starts.
//!
//! ```sh
//! cargo run --example payment_worker -- --nats nats://127.0.0.1:4222 [--step-delay-ms 2000]
//! ```
//!
//! Start several to see them share the commands; kill one mid-step (with a
//! step delay) to see the step retried on another. See the README's walkthrough.

use std::time::Duration;

use clap::Parser;
use orchestrix::{NatsOptions, Worker};

#[path = "shared/payment.rs"]
mod payment;

#[derive(Parser, Debug)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix, as given to the coordinator.
    #[arg(long, env = "ORCHESTRIX_PREFIX", default_value = "orchestrix")]
    prefix: String,
    /// Make every step take this long (to try timeouts and crashes).
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// Pause a run whose payment is still declined after its retries, for
    /// `orchestrix resume` / `rollback` (a version of its own).
    #[arg(long)]
    pause_when_exhausted: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match serve().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error's own words (`cannot connect to NATS at …`), not its Debug form.
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve() -> Result<(), orchestrix::WorkerError> {
    // Logs, and spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = orchestrix::telemetry::init("payment-worker", "info");
    let args = Args::parse();
    // The flow's definition and handlers, as `payment_flow` runs them embedded;
    // starting the worker registers the definition in the cluster.
    let flow =
        payment::payment_flow(Duration::from_millis(args.step_delay_ms), args.pause_when_exhausted);
    let version = flow.definition().version();
    let worker = Worker::builder()
        .nats(NatsOptions::new(args.nats.clone()))
        .prefix(&args.prefix)
        .flow(flow)
        .start()
        .await?;
    println!(
        "worker {} serving payment-flow version {version} on {} (ctrl-c to drain and stop)",
        worker.id(),
        orchestrix::redact_url(&args.nats)
    );
    worker.run_until_signal().await;
    Ok(())
}
