//! Shared test helpers: a paused-time actix system, and a journal that steps write to.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Runs `f` on an actix system whose tokio clock is paused: timers fire in
/// order as soon as every task is idle, so retry delays and timeouts are
/// exact and cost no real time.
pub fn paused<F, Fut>(f: F) -> Fut::Output
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("tokio runtime")
    });
    system.block_on(f())
}

/// What steps did, in order, with the paused clock's time of each entry.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<(Duration, String)>>>, Arc<Mutex<Option<Instant>>>);

impl Journal {
    pub fn new() -> Self {
        let j = Journal::default();
        *j.1.lock().unwrap() = Some(Instant::now());
        j
    }

    pub fn log(&self, what: impl Into<String>) {
        let t0 = self.1.lock().unwrap().expect("journal started");
        self.0.lock().unwrap().push((t0.elapsed(), what.into()));
    }

    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|(_, e)| e.clone()).collect()
    }

    pub fn times_of(&self, what: &str) -> Vec<Duration> {
        self.0.lock().unwrap().iter().filter(|(_, e)| e == what).map(|(t, _)| *t).collect()
    }
}

/// `actual` is `expected` to the millisecond. Tokio's timer wheel counts
/// whole milliseconds and rounds a deadline up to the next one, so a span
/// measured across several timers in paused time can come out one
/// millisecond off either way; more is a real difference.
#[track_caller]
pub fn assert_ms(actual: Duration, expected: Duration) {
    let ms = Duration::from_millis(1);
    assert!(
        actual + ms >= expected && actual <= expected + ms,
        "{actual:?} is not {expected:?} (to the millisecond)"
    );
}

/// `reserve-stock` (compensable), then `process-payment`, whose attempt
/// outlives its 200 ms timeout: the run fails on an unknown outcome.
pub fn payment_that_times_out(name: &str) -> orchestrix_coordinator::Flow<()> {
    orchestrix_coordinator::create::<()>(name)
        .step_with("reserve-stock", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
        .step_with(
            "process-payment",
            |_| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            },
            |o| o.timeout(Duration::from_millis(200)),
        )
}
