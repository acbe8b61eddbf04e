//! The quick start, in Rust: reserve stock, process the payment, send the email.
//! A payment over 1000 is declined; the payment step retries, then fails for
//! good, and the stock reservation is released.
//!
//! Run it with `cargo run --example payment_flow`.

use std::time::Duration;

use orchestrix::{RunOptions, RunReport, RunStatus, StepError, create};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct PaymentInput {
    order_id: String,
    amount: u64,
    user_id: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payment_flow = create::<PaymentInput>("payment-flow")
        .step_with(
            "reserve-stock",
            |ctx| async move {
                println!("Reserving stock for order {}", ctx.input.order_id);
                Ok(())
            },
            |o| {
                o.compensate(|ctx| async move {
                    println!("Releasing stock for order {}", ctx.input.order_id);
                    Ok(())
                })
            },
        )
        .step_with(
            "process-payment",
            |ctx| async move {
                println!(
                    "Processing payment of ${} for user {}",
                    ctx.input.amount, ctx.input.user_id
                );
                if ctx.input.amount > 1000 {
                    return Err(StepError::retryable("Payment declined: limit exceeded"));
                }
                Ok(())
            },
            |o| o.retries(3).retry_delay(Duration::from_millis(1000)),
        )
        .step("send-email", |ctx| async move {
            println!("Sending confirmation email to user {}", ctx.input.user_id);
            Ok(())
        });

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
