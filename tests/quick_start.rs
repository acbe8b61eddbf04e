//! The quick start through the facade: the same flow, both runs, the report's JSON.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{Flow, RunOptions, RunStatus, StepError, StepStatus, create};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct PaymentInput {
    order_id: String,
    amount: u64,
    user_id: String,
}

type Log = Arc<Mutex<Vec<String>>>;

fn payment_flow(log: &Log) -> Flow<PaymentInput> {
    let (l1, l2, l3, l4) = (log.clone(), log.clone(), log.clone(), log.clone());
    create::<PaymentInput>("payment-flow")
        .step_with(
            "reserve-stock",
            move |ctx| {
                l1.lock()
                    .unwrap()
                    .push(format!("Reserving stock for order {}", ctx.input.order_id));
                async { Ok(()) }
            },
            move |o| {
                o.compensate(move |ctx| {
                    l2.lock()
                        .unwrap()
                        .push(format!("Releasing stock for order {}", ctx.input.order_id));
                    async { Ok(()) }
                })
            },
        )
        .step_with(
            "process-payment",
            move |ctx| {
                l3.lock().unwrap().push(format!(
                    "Processing payment of ${} for user {}",
                    ctx.input.amount, ctx.input.user_id
                ));
                async move {
                    if ctx.input.amount > 1000 {
                        return Err(StepError::retryable("Payment declined: limit exceeded"));
                    }
                    Ok(())
                }
            },
            |o| o.retries(3).retry_delay(Duration::from_millis(5)),
        )
        .step("send-email", move |ctx| {
            l4.lock()
                .unwrap()
                .push(format!("Sending confirmation email to user {}", ctx.input.user_id));
            async { Ok(()) }
        })
}

#[tokio::test]
async fn success_runs_every_step_and_compensates_nothing() {
    let log = Log::default();
    let report = payment_flow(&log)
        .run(PaymentInput { order_id: "order_1".into(), amount: 50, user_id: "user_A".into() })
        .await
        .unwrap();
    assert_eq!(report.status, RunStatus::Completed);
    let lines: Vec<_> = report.steps.iter().map(|s| format!("{}: {}", s.name, s.status)).collect();
    assert_eq!(
        lines,
        ["reserve-stock: completed", "process-payment: completed", "send-email: completed"]
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            "Reserving stock for order order_1",
            "Processing payment of $50 for user user_A",
            "Sending confirmation email to user user_A",
        ]
    );
}

#[tokio::test]
async fn failure_retries_then_releases_the_stock() {
    let log = Log::default();
    let flow = payment_flow(&log);
    let input =
        || PaymentInput { order_id: "order_2".into(), amount: 2000, user_id: "user_B".into() };
    let opts = RunOptions::new().key("payment:order_2").ttl(Duration::from_secs(3600));
    let report = flow.run_with(input(), opts.clone()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let failed = report.failed().unwrap();
    assert_eq!(failed.name, "process-payment");
    assert_eq!(failed.attempts, 4);
    assert_eq!(failed.error.as_deref(), Some("Payment declined: limit exceeded"));
    assert_eq!(report.step("reserve-stock").unwrap().status, StepStatus::Compensated);
    assert_eq!(report.step("send-email").unwrap().status, StepStatus::NotRun);
    let expected: Vec<String> = std::iter::once("Reserving stock for order order_2".to_owned())
        .chain(std::iter::repeat_n("Processing payment of $2000 for user user_B".to_owned(), 4))
        .chain(std::iter::once("Releasing stock for order order_2".to_owned()))
        .collect();
    assert_eq!(*log.lock().unwrap(), expected);

    // The key: the same payment again does nothing and returns the same report.
    let again = flow.run_with(input(), opts).await.unwrap();
    assert_eq!(again, report);
    assert_eq!(log.lock().unwrap().len(), expected.len());

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["status"], "failed");
    assert!(json["durationMs"].as_u64().unwrap() >= 15);
    assert_eq!(json["steps"][1]["name"], "process-payment");
    assert_eq!(json["steps"][1]["status"], "failed");
    assert_eq!(json["steps"][1]["attempts"], 4);
    assert_eq!(json["steps"][1]["error"], "Payment declined: limit exceeded");
}
