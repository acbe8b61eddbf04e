//! A flow built in Rust is held to the same checks as a flow file: degenerate
//! policies are refused with the reason, before anything runs.

use std::time::Duration;

use orchestrix_coordinator::{RunError, RunOptions, create};

#[tokio::test]
async fn degenerate_policies_and_empty_flows_are_refused_with_the_reason() {
    let many =
        create::<u32>("many").step_with("x", |_ctx| async { Ok(()) }, |o| o.retries(4_000_000_000));
    let err = many.run(1).await.unwrap_err().to_string();
    assert!(err.contains("retries are at most 100000"), "{err}");

    let instant = create::<u32>("instant").step_with(
        "x",
        |_ctx| async { Ok(()) },
        |o| o.timeout(Duration::ZERO),
    );
    let err = instant.run(1).await.unwrap_err().to_string();
    assert!(err.contains("a timeout of 0 is no time at all"), "{err}");

    let upside_down = create::<u32>("upside-down").step_with(
        "x",
        |_ctx| async { Ok(()) },
        |o| o.retries(2).retry_delay(Duration::from_secs(10)).max_delay(Duration::from_secs(1)),
    );
    let err = upside_down.run(1).await.unwrap_err().to_string();
    assert!(err.contains("is over the max delay"), "{err}");

    let empty = create::<u32>("empty");
    let err = empty.run(1).await.unwrap_err();
    assert!(matches!(err, RunError::InvalidFlow(_)), "{err}");
    assert!(err.to_string().contains("no steps"), "{err}");

    let fine = create::<u32>("fine").step("x", |_ctx| async { Ok(()) });
    let zero = RunOptions::new().timeout(Duration::ZERO);
    let err = fine.run_with(1, zero).await.unwrap_err();
    assert!(matches!(err, RunError::BadOption(_)), "{err}");

    // Durations as long as the wire can say (2^64 ms): added to a time they
    // once wrapped around to a deadline in the past, and the run resent its
    // first command forever.
    let forever = Duration::from_millis(u64::MAX);
    let eternal =
        create::<u32>("eternal").step_with("x", |_ctx| async { Ok(()) }, |o| o.timeout(forever));
    let err = eternal.run(1).await.unwrap_err().to_string();
    assert!(err.contains("over the longest allowed, 100 years"), "{err}");
    for options in [RunOptions::new().timeout(forever), RunOptions::new().key("k").ttl(forever)] {
        let err = fine.run_with(1, options).await.unwrap_err();
        assert!(matches!(err, RunError::BadOption(_)), "{err}");
        assert!(err.to_string().contains("100 years"), "{err}");
    }
    let century = RunOptions::new().timeout(orchestrix_proto::time::MAX_DURATION);
    assert!(fine.run_with(1, century).await.is_ok(), "a hundred years is allowed");
    let past_the_end = std::time::UNIX_EPOCH + forever + Duration::from_secs(1);
    assert_eq!(orchestrix_proto::time::unix_ms(past_the_end), u64::MAX, "saturates, not wraps");
}
