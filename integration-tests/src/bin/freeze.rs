//! Many trials of the frozen-node scenario (`orchestrix_integration_tests::
//! frozen`): `--coordinators N` of flow
//! `pay` on the node to freeze (default 2). A finding panics with the run's
//! story and the process exits non-zero.
//!
//! ```sh
//! cargo build -j2 -p orchestrix-coordinator -p orchestrix-integration-tests --bins
//! target/debug/freeze --trials 30 [--coordinators 2]
//! ```

// A harness whose findings are panics (with the run's story): unwrapping
// what the harness itself set up is the same kind of failure, said at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orchestrix_integration_tests::frozen::trial;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let number = |flag: &str, default: u32| match std::env::args().skip_while(|a| a != flag).nth(1)
    {
        Some(n) => n.parse().unwrap_or_else(|_| {
            eprintln!("{flag} takes a number, not `{n}`");
            std::process::exit(2)
        }),
        None => default,
    };
    let trials = number("--trials", 1);
    let on_frozen = number("--coordinators", 2);
    for t in 1..=trials {
        eprintln!("trial {t} of {trials}");
        trial(on_frozen).await;
    }
    eprintln!("no finding in {trials} trial(s)");
}
