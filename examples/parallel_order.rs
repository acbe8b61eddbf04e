//! A parallel group: reserve stock in two warehouses and authorise the card
//! at the same time, then ship. When the card is declined, the warehouse
//! still reserving is stopped, both reservations are released at the same
//! time, and then the order check before the group is undone.
//!
//! Run it with `cargo run --example parallel_order`.

use std::time::Duration;

use orchestrix::{StepContext, StepError, create};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    amount: u32,
}

/// A side effect that takes `ms`, then says what it did.
async fn work(what: &str, order: &Order, ms: u64) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let done = format!("{what} for {}", order.id);
    println!("  {done}");
    done
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let undo = |what: &'static str| {
        move |o: orchestrix::StepOptions<Order>| {
            o.compensate(move |ctx: StepContext<Order>| async move {
                work(what, &ctx.input, 20).await;
                Ok(())
            })
        }
    };
    let flow = create::<Order>("order")
        .step_with(
            "check-order",
            |ctx| async move { Ok(work("checked", &ctx.input, 10).await) },
            undo("check undone"),
        )
        .parallel("reserve", |g| {
            g.step_with(
                "warehouse-east",
                |ctx| async move { Ok(work("reserved east", &ctx.input, 50).await) },
                undo("east released"),
            )
            .step_with(
                "warehouse-west",
                |ctx| async move { Ok(work("reserved west", &ctx.input, 400).await) },
                undo("west released"),
            )
            .step_with(
                "authorise-card",
                |ctx: StepContext<Order>| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if ctx.input.amount > 1000 {
                        return Err(StepError::permanent("card declined"));
                    }
                    Ok(work("card authorised", &ctx.input, 0).await)
                },
                undo("authorisation voided"),
            )
        })
        .step("ship", |ctx: StepContext<Order>| async move {
            // Every member's output is here.
            let east: String = ctx.output("warehouse-east")?;
            let west: String = ctx.output("warehouse-west")?;
            Ok(format!("shipped ({east}; {west})"))
        });

    println!("order_1, 50:");
    let report = flow.run(Order { id: "order_1".into(), amount: 50 }).await?;
    println!("{report}");

    println!("order_2, 2000 (declined):");
    let report = flow.run(Order { id: "order_2".into(), amount: 2000 }).await?;
    println!("{report}");
    Ok(())
}
