//! The quick start's steps, served by a worker process over NATS.
//!
//! ```sh
//! cargo run --example payment_worker -- --nats nats://127.0.0.1:4222 [--step-delay-ms 2000]
//! ```
//!
//! Start several to see them share the commands; kill one mid-step (with a
//! step delay) to see the step retried on another. See the README's walkthrough.

use std::time::Duration;

use clap::Parser;
use orchestrix::{NatsOptions, StepContext, StepError, Worker};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct PaymentInput {
    order_id: String,
    amount: u64,
    user_id: String,
}

#[derive(Parser, Debug)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix, as given to the coordinator.
    #[arg(long, default_value = "orchestrix")]
    prefix: String,
    /// Make every step take this long (to try timeouts and crashes).
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
}

async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
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
    let _telemetry = orchestrix::coordinator::observability::init("payment-worker", "info");
    let args = Args::parse();
    let delay = args.step_delay_ms;
    let worker = Worker::builder()
        .nats(NatsOptions::new(args.nats.clone()))
        .prefix(&args.prefix)
        .steps::<PaymentInput>("payment-flow", |f| {
            f.step("reserve-stock", move |ctx: StepContext<PaymentInput>| async move {
                println!("Reserving stock for order {}", ctx.input.order_id);
                pause(delay).await;
                Ok(())
            })
            .compensate("reserve-stock", move |ctx| async move {
                println!("Releasing stock for order {}", ctx.input.order_id);
                pause(delay).await;
                Ok(())
            })
            .step("process-payment", move |ctx| async move {
                println!(
                    "Processing payment of ${} for user {}",
                    ctx.input.amount, ctx.input.user_id
                );
                pause(delay).await;
                if ctx.input.amount > 1000 {
                    return Err(StepError::retryable("Payment declined: limit exceeded"));
                }
                Ok(())
            })
            .step("send-email", move |ctx| async move {
                println!("Sending confirmation email to user {}", ctx.input.user_id);
                pause(delay).await;
                Ok(())
            })
        })
        .start()
        .await?;
    println!(
        "worker {} serving payment-flow on {} (ctrl-c to drain and stop)",
        worker.id(),
        args.nats
    );
    worker.run_until_signal().await;
    Ok(())
}
