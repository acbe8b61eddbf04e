//! The quick start, in Rust: reserve stock, process the payment, send the email.
//! A payment over 1000 is declined; the payment step retries, then fails for
//! good, and the stock reservation is released.
//!
//! Run it with `cargo run --example payment_flow`. The flow is defined once,
//! in `examples/shared/payment.rs`, which `payment_worker` serves over NATS.

use std::time::Duration;

use orchestrix::{RunOptions, RunReport, RunStatus};

#[path = "shared/payment.rs"]
mod payment;
use payment::{PaymentInput, payment_flow};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payment_flow = payment_flow(Duration::ZERO, false);

    let success = payment_flow
        .run(PaymentInput { order_id: "order_1".into(), amount: 50, user_id: "user_A".into() })
        .await?;
    print_report(&success);

    let failure = payment_flow
        .run_with(
            PaymentInput { order_id: "order_2".into(), amount: 2000, user_id: "user_B".into() },
            RunOptions::new().key("payment:order_2").ttl(Duration::from_secs(60 * 60)),
        )
        .await?;
    print_report(&failure);

    if failure.status == RunStatus::Failed
        && let Some(step) = failure.failed()
    {
        println!("{}", step.name);
        println!("{}", step.attempts);
        println!("{}", step.error.as_deref().unwrap_or_default());
    }
    println!();
    println!("The failed run's report as JSON:");
    println!("{}", serde_json::to_string_pretty(&failure)?);
    Ok(())
}

fn print_report(report: &RunReport) {
    println!("{}", report.status);
    println!("{}", report.duration.as_millis());
    let steps: Vec<String> =
        report.steps.iter().map(|s| format!("{}: {}", s.name, s.status)).collect();
    println!("{steps:#?}");
    println!();
}
