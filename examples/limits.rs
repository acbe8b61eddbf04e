//! Concurrency limits: runs with one concurrency key take turns (one
//! account's transfers never overlap), and a step with `max_in_flight`
//! keeps a fragile dependency under its limit across all runs.
//!
//! Run it with `cargo run --example limits`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrix::{RunOptions, RunStatus, StepContext, create};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let calls = in_flight.clone();
    let flow = create::<u32>("transfer")
        .step("debit", move |ctx: StepContext<u32>| async move {
            println!("{:>5} ms  transfer {} debits", t0.elapsed().as_millis(), ctx.input);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        })
        .step_with(
            "notify-bank",
            move |ctx: StepContext<u32>| {
                let calls = calls.clone();
                async move {
                    let now = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    println!(
                        "{:>5} ms  transfer {} calls the bank ({now} call(s) in flight)",
                        t0.elapsed().as_millis(),
                        ctx.input
                    );
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    calls.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
            // The bank takes at most two calls at once, from all transfers.
            |o| o.max_in_flight(2),
        );

    // Three transfers of account 42, two of account 7 and one of account 99,
    // started at once: each account's transfers take turns, the accounts run
    // side by side, and the third bank call at once waits for a slot.
    let mut runs = Vec::new();
    for (n, account) in [(1, 42), (2, 42), (3, 42), (4, 7), (5, 7), (6, 99)] {
        let options = RunOptions::new().concurrency_key(format!("account:{account}"));
        runs.push(flow.start(n, options).await?);
    }
    let waiting = flow.embedded()?.status(runs[2].run_id()).await?.map(|r| r.status);
    println!("transfer 3 is {}", waiting.unwrap_or(RunStatus::Running));
    for run in runs {
        let report = run.report().await?;
        println!("{report}");
    }
    Ok(())
}
