//! The quick start's flow, defined once: `payment_flow` runs it embedded,
//! `payment_worker` serves the very same definition over NATS (and registers
//! it, so a coordinator needs no flow file).

use std::time::Duration;

use orchestrix::{Flow, StepError, create};
use serde::{Deserialize, Serialize};

/// The quick start's input: `{"orderId": "order_1", "amount": 50, "userId": "user_A"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PaymentInput {
    pub(crate) order_id: String,
    pub(crate) amount: u64,
    pub(crate) user_id: String,
}

/// Reserve stock (released on rollback), process the payment (3 retries,
/// 1 s apart, 10 s per attempt; over 1000 is declined), send the email.
/// `examples/payment-flow.toml` describes the same definition for workers
/// in other languages (same version). `step_delay` makes
/// every step take that long, to try timeouts and crashes. With
/// `pause_when_declined` a payment still declined after its retries pauses
/// the run for an operator (`orchestrix resume` / `rollback`) instead of
/// rolling it back: another definition, so another version.
pub(crate) fn payment_flow(step_delay: Duration, pause_when_declined: bool) -> Flow<PaymentInput> {
    let pause = move || async move {
        if !step_delay.is_zero() {
            tokio::time::sleep(step_delay).await;
        }
    };
    create::<PaymentInput>("payment-flow")
        .step_with(
            "reserve-stock",
            move |ctx| async move {
                println!("Reserving stock for order {}", ctx.input.order_id);
                pause().await;
                Ok(())
            },
            |o| {
                o.compensate(move |ctx| async move {
                    println!("Releasing stock for order {}", ctx.input.order_id);
                    pause().await;
                    Ok(())
                })
            },
        )
        .step_with(
            "process-payment",
            move |ctx| async move {
                println!(
                    "Processing payment of ${} for user {}",
                    ctx.input.amount, ctx.input.user_id
                );
                pause().await;
                if ctx.input.amount > 1000 {
                    return Err(StepError::retryable("Payment declined: limit exceeded"));
                }
                Ok(())
            },
            move |o| {
                let o = o
                    .retries(3)
                    .retry_delay(Duration::from_millis(1000))
                    .timeout(Duration::from_secs(10));
                if pause_when_declined { o.pause_when_exhausted() } else { o }
            },
        )
        .step("send-email", move |ctx| async move {
            println!("Sending confirmation email to user {}", ctx.input.user_id);
            pause().await;
            Ok(())
        })
}
