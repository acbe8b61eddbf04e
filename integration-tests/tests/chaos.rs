//! The fault-injection harness, short version: 200 runs under one coordinator
//! kill, one worker kill, one kill of the NATS node leading the runs stream and
//! one SIGSTOP/SIGCONT of a worker. No run may be lost or stuck, no command run
//! twice (but for a killed worker), no maybe-done step of a failed run left
//! uncompensated. See `src/bin/chaos.rs` and docs/reliability.md.
//!
//! Needs the `orchestrix` binary built (`scripts/test.sh` builds every binary
//! first) and `nats-server` (`$NATS_SERVER_BIN`).

use std::process::Stdio;
use std::time::Duration;

use orchestrix_integration_tests::built;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_chaos_run_finds_nothing() {
    let orchestrix = built("orchestrix");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chaos"))
        .arg("--short")
        .arg("--orchestrix")
        .arg(&orchestrix)
        .arg("--worker")
        .arg(env!("CARGO_BIN_EXE_ledger_worker"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the chaos binary starts");
    let pid = child.id().expect("a pid");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let read = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s).await;
            s
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = match tokio::time::timeout(Duration::from_secs(240), child.wait()).await {
        Ok(status) => status.expect("chaos exits"),
        Err(_) => {
            // SIGTERM lets the harness kill what it started.
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
            if status.is_err() {
                let _ = child.kill().await;
            }
            panic!("chaos did not finish within 240 s");
        }
    };
    let out = out.await.unwrap_or_default();
    let err = err.await.unwrap_or_default();
    assert!(status.success(), "chaos exited with {status}\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(out.contains("verdict: PASS"), "{out}");
}
