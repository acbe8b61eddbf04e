//! The `orchestrix` binary and the example worker, end to end, as a user runs them.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use orchestrix_integration_tests::{ChildProcess, NatsServer, built};

const SECS: Duration = Duration::from_secs(1);

fn flow_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/payment-flow.toml")
}

async fn orchestrix(url: &str, args: &[&str]) -> Output {
    let out =
        tokio::process::Command::new(built("orchestrix")).args(["--nats", url]).args(args).output();
    tokio::time::timeout(60 * SECS, out).await.unwrap().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_run_status_with_the_example_worker() {
    let server = NatsServer::start();
    let url = server.url();
    // No flow file: the coordinator serves what the worker registers.
    let coordinator = ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let worker = ChildProcess::spawn(&built("examples/payment_worker"), &["--nats", &url]);
    worker.wait_for_line("worker ", 30 * SECS).await;
    // The coordinator is ready when it answers: a status request for an unknown run is rejected.
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let o = orchestrix(&url, &["status", "00000000-0000-0000-0000-000000000000"]).await;
        if String::from_utf8_lossy(&o.stderr).contains("unknown run") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "coordinator not answering: {o:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The registry lists the flow, its version and the worker; the TOML
    // description of the same flow (for other languages) is the same version.
    let listed = orchestrix(&url, &["flows", "list", "--json"]).await;
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["flow"], "payment-flow");
    assert_eq!(listed[0]["workers"].as_array().unwrap().len(), 1);
    let version = listed[0]["version"].as_str().unwrap().to_owned();
    let applied = orchestrix(&url, &["flows", "apply", flow_file().to_str().unwrap()]).await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    assert_eq!(stdout(&applied).trim(), format!("payment-flow  version {version}"));
    let shown = orchestrix(&url, &["flows", "show", "payment-flow"]).await;
    assert!(
        stdout(&shown).contains("process-payment          retries 3, delay 1s, timeout 10s"),
        "{shown:?}"
    );

    // Success: exit 0, the quick start's JSON names.
    let ok = orchestrix(
        &url,
        &[
            "run",
            "payment-flow",
            "--json",
            "--input",
            r#"{"orderId":"order_1","amount":50,"userId":"user_A"}"#,
        ],
    )
    .await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["status"], "completed");
    let steps: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}: {}", s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        ["reserve-stock: completed", "process-payment: completed", "send-email: completed"]
    );
    assert!(report["runId"].is_string() && report["durationMs"].is_u64());

    // Failure: exit 1, four payment attempts, the stock released.
    let failed = orchestrix(
        &url,
        &[
            "run",
            "payment-flow",
            "--input",
            r#"{"orderId":"order_2","amount":2000,"userId":"user_B"}"#,
        ],
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let text = stdout(&failed);
    assert!(text.contains(": failed in "), "{text}");
    assert!(text.contains("failed at process-payment: Payment declined: limit exceeded"), "{text}");
    assert!(text.contains("process-payment: failed (4 attempts)"), "{text}");
    assert!(text.contains("reserve-stock: compensated"), "{text}");
    worker.wait_for_line("Releasing stock for order order_2", 10 * SECS).await;
    assert_eq!(worker.lines_starting("Processing payment of $2000 for user user_B").len(), 4);

    // Detached, then followed by id.
    let detached = orchestrix(
        &url,
        &[
            "run",
            "payment-flow",
            "--detach",
            "--json",
            "--input",
            r#"{"orderId":"order_3","amount":10,"userId":"user_C"}"#,
        ],
    )
    .await;
    assert_eq!(detached.status.code(), Some(0), "{detached:?}");
    let id: serde_json::Value = serde_json::from_slice(&detached.stdout).unwrap();
    let id = id["runId"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let st = orchestrix(&url, &["status", &id, "--json"]).await;
        assert_eq!(st.status.code(), Some(0), "{st:?}");
        let r: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        if r["status"] == "completed" {
            break;
        }
        assert_eq!(r["status"], "running");
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // History: the three runs, newest first, filterable.
    let all = orchestrix(&url, &["list", "--json"]).await;
    assert_eq!(all.status.code(), Some(0), "{all:?}");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[0]["runId"].as_str(), Some(id.as_str()), "newest first");
    let failed =
        orchestrix(&url, &["list", "--status", "failed", "--flow", "payment-flow", "--json"]).await;
    let failed: Vec<serde_json::Value> = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["failedStep"], "process-payment");
    let table = orchestrix(&url, &["list", "--limit", "2"]).await;
    assert_eq!(stdout(&table).lines().count(), 2, "{table:?}");
    let bad = orchestrix(&url, &["list", "--status", "weird"]).await;
    assert_eq!(bad.status.code(), Some(2));

    // Watch a run live: its retries, its rollback, its end.
    let watched = orchestrix(
        &url,
        &[
            "run",
            "payment-flow",
            "--detach",
            "--input",
            r#"{"orderId":"order_4","amount":5000,"userId":"user_D"}"#,
        ],
    )
    .await;
    let watched_id = stdout(&watched).trim().to_owned();
    let watch = orchestrix(&url, &["watch", &watched_id]).await;
    assert_eq!(watch.status.code(), Some(1), "{watch:?}");
    let text = stdout(&watch);
    assert!(
        text.contains(
            "process-payment: attempt 3 failed (Payment declined: limit exceeded); retry in 1000 ms"
        ),
        "{text}"
    );
    assert!(text.contains("reserve-stock: compensated"), "{text}");
    assert!(text.contains("run ended: failed"), "{text}");
    // Watching a finished run prints its report at once.
    let again = orchestrix(&url, &["watch", &watched_id, "--json"]).await;
    assert_eq!(again.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(r["status"], "failed");
    // The same idempotency key again: the earlier run, and the CLI says so.
    let keyed = [
        "run",
        "payment-flow",
        "--key",
        "order-7",
        "--input",
        r#"{"orderId":"o7","amount":5,"userId":"u"}"#,
    ];
    let first = orchestrix(&url, &keyed).await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert!(!String::from_utf8_lossy(&first.stderr).contains("idempotency key"), "{first:?}");
    let again = orchestrix(&url, &keyed).await;
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("the idempotency key names run"),
        "{again:?}"
    );
    assert_eq!(
        stdout(&again).lines().next(),
        stdout(&first).lines().next(),
        "the same run's report"
    );
    // `status` follows the same exit codes as `run` and `watch`.
    let failed_status = orchestrix(&url, &["status", &watched_id]).await;
    assert_eq!(failed_status.status.code(), Some(1), "{failed_status:?}");

    // Live as JSON: a snapshot first, then events, all in camelCase.
    let live = orchestrix(
        &url,
        &[
            "run",
            "payment-flow",
            "--detach",
            "--input",
            r#"{"orderId":"o5","amount":5000,"userId":"u"}"#,
        ],
    )
    .await;
    let live_id = stdout(&live).trim().to_owned();
    let watch = orchestrix(&url, &["watch", &live_id, "--json"]).await;
    let lines: Vec<serde_json::Value> =
        stdout(&watch).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines[0]["snapshot"]["runId"].is_string(), "{lines:?}");
    assert!(lines[1..].iter().all(|l| l["runId"].is_string() && l["atMs"].is_u64()), "{lines:?}");
    assert!(!stdout(&watch).contains("\"run_id\""), "one case: {watch:?}");

    // Input from a file, and a large one from stdin.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.json");
    std::fs::write(&file, r#"{"orderId":"o6","amount":7,"userId":"u"}"#).unwrap();
    let from_file =
        orchestrix(&url, &["run", "payment-flow", "--input", &format!("@{}", file.display())])
            .await;
    assert_eq!(from_file.status.code(), Some(0), "{from_file:?}");
    let big =
        format!(r#"{{"orderId":"o7","amount":8,"userId":"u","notes":"{}"}}"#, "x".repeat(300_000));
    let mut child = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url, "run", "payment-flow", "--input", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(big.as_bytes()).await.unwrap();
    }
    let from_stdin =
        tokio::time::timeout(60 * SECS, child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(
        from_stdin.status.code(),
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&from_stdin.stderr)
    );
    let missing = orchestrix(&url, &["run", "payment-flow", "--input", "@/nonexistent.json"]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read --input file /nonexistent.json")
    );

    // Mistakes: exit 2 and a readable message.
    let unknown = orchestrix(&url, &["run", "nope"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no coordinator serves flow `nope`"),
        "{unknown:?}"
    );
    let bad_json = orchestrix(&url, &["run", "payment-flow", "--input", "{oops"]).await;
    assert_eq!(bad_json.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_json.stderr).contains("--input is not valid JSON"),
        "{bad_json:?}"
    );
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_is_a_clear_error_and_exit_2() {
    let port = orchestrix_integration_tests::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    for args in
        [vec!["run", "payment-flow"], vec!["serve", "--flows", flow_file().to_str().unwrap()]]
    {
        let o = orchestrix(&url, &args).await;
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(err.contains(&format!("cannot connect to NATS at {url}")), "{err}");
    }
    assert!(started.elapsed() < 20 * SECS, "fails fast, does not hang");
    let bad_flows = orchestrix(&url, &["serve", "--flows", "/nonexistent.toml"]).await;
    assert_eq!(bad_flows.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_flows.stderr)
            .contains("cannot read flow file /nonexistent.toml")
    );
}

const GREET: &str = r#"
[[flow]]
name = "greet"
version = "release-1"

[[flow.step]]
name = "hello"
compensable = true

[[flow.step]]
name = "bye"
"#;

/// A flow applied from TOML (as for a worker in another language), served
/// by a worker that knows only step names, run by a coordinator with no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toml_flow_applied_with_the_cli_is_served_by_a_worker() {
    use orchestrix::{StepContext, StepError, Worker};
    let server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("greet.toml");
    std::fs::write(&file, GREET).unwrap();
    let applied = orchestrix(&url, &["flows", "apply", file.to_str().unwrap()]).await;
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    assert_eq!(stdout(&applied).trim(), "greet  version release-1");
    // Applying it again changes nothing; a different flow under the same label is refused.
    let again = orchestrix(&url, &["flows", "apply", file.to_str().unwrap()]).await;
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    std::fs::write(&file, GREET.replace("name = \"bye\"", "name = \"later\"")).unwrap();
    let conflict = orchestrix(&url, &["flows", "apply", file.to_str().unwrap()]).await;
    assert_eq!(conflict.status.code(), Some(2), "{conflict:?}");
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("nothing applied"), "{conflict:?}");
    assert!(
        String::from_utf8_lossy(&conflict.stderr).contains(
            "flow `greet` version `release-1` is already registered with a different definition"
        ),
        "{conflict:?}"
    );

    let coordinator = ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let worker = Worker::builder()
        .nats(orchestrix::NatsOptions::new(url.clone()))
        .steps::<String>("greet", |f| {
            f.step(
                "hello",
                |ctx: StepContext<String>| async move { Ok(format!("hello {}", ctx.input)) },
            )
            .compensate("hello", |_ctx| async { Ok(()) })
            .step("bye", |ctx| async move {
                if ctx.input == "nobody" {
                    return Err(StepError::permanent("nobody to greet"));
                }
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    let ok = loop {
        let o = orchestrix(&url, &["run", "greet", "--json", "--input", r#""ada""#]).await;
        if o.status.code() == Some(0) || tokio::time::Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["version"], "release-1");
    assert_eq!(report["steps"][0]["status"], "completed");
    // The compensation the file declares runs when `bye` fails.
    let failed = orchestrix(&url, &["run", "greet", "--input", r#""nobody""#]).await;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(stdout(&failed).contains("hello: compensated"), "{failed:?}");

    // Listed with the worker that serves it (every version, by step names).
    let listed = orchestrix(&url, &["flows", "list", "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["version"], "release-1");
    assert!(listed[0]["registeredBy"].as_str().unwrap().starts_with("cli:"), "{listed:?}");
    assert_eq!(listed[0]["newRuns"], true);
    assert_eq!(listed[0]["unserved"].as_array().unwrap().len(), 0);
    assert_eq!(listed[0]["workers"][0], worker.id());
    // Output cut short (`| head`): a quiet exit, never a panic.
    let piped = tokio::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {} --nats {url} flows show greet | head -c 1 >/dev/null",
                built("orchestrix").display()
            ),
        ])
        .output()
        .await
        .unwrap();
    assert!(piped.status.success(), "{piped:?}");
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("panicked"), "{piped:?}");
    // A dev server on a port in use is refused rather than joined.
    let port = url.rsplit(':').next().unwrap();
    let busy = orchestrix(&url, &["dev", "--port", port]).await;
    assert_eq!(busy.status.code(), Some(2), "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is not free"), "{busy:?}");
    let unknown = orchestrix(&url, &["flows", "show", "nope"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no flow `nope` is registered"));
    worker.shutdown().await;
    drop(coordinator);
}

/// Operating runs from the command line, with the example worker: a declined
/// payment pauses and is rolled back by an operator; a run is cancelled mid-step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_pause_and_rollback_from_the_cli_with_the_example_worker() {
    let server = NatsServer::start();
    let url = server.url();
    let _coordinator = ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let worker = ChildProcess::spawn(
        &built("examples/payment_worker"),
        // Slow steps: a cancel lands mid-run even on a busy machine.
        &["--nats", &url, "--pause-when-exhausted", "--step-delay-ms", "1000"],
    );
    worker.wait_for_line("worker ", 30 * SECS).await;
    let start = |input: &'static str| {
        let url = url.clone();
        async move {
            let deadline = tokio::time::Instant::now() + 30 * SECS;
            loop {
                let o =
                    orchestrix(&url, &["run", "payment-flow", "--detach", "--input", input]).await;
                if o.status.code() == Some(0) {
                    return stdout(&o).trim().to_owned();
                }
                assert!(tokio::time::Instant::now() < deadline, "{o:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let status_of = |id: String| {
        let url = url.clone();
        async move {
            let o = orchestrix(&url, &["status", &id, "--json"]).await;
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
        }
    };

    // Declined four times: paused, not rolled back; an attached `run` says so.
    // The detached start goes first: it is sent again until a coordinator
    // serves the flow (the worker's registration may still be on its way).
    let id = start(r#"{"orderId":"order_9","amount":2000,"userId":"user_Z"}"#).await;
    let attached = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url, "run", "payment-flow", "--input"])
        .arg(r#"{"orderId":"order_8","amount":2000,"userId":"user_X"}"#)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let r = status_of(id.clone()).await;
        if r["status"] == "paused" {
            assert_eq!(r["steps"][1]["status"], "paused");
            assert_eq!(r["steps"][1]["attempts"], 4);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paused = orchestrix(&url, &["list", "--status", "paused", "--json"]).await;
    assert!(stdout(&paused).contains(&id), "{paused:?}");
    // The attached run pauses too: roll it back, and
    // its command ends, having said how to go on.
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&paused.stdout).unwrap();
    let other = listed.iter().map(|r| r["runId"].as_str().unwrap().to_owned()).find(|r| *r != id);
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    let other = match other {
        Some(o) => o,
        None => loop {
            let l = orchestrix(&url, &["list", "--status", "paused", "--json"]).await;
            let l: Vec<serde_json::Value> = serde_json::from_slice(&l.stdout).unwrap();
            if let Some(o) =
                l.iter().map(|r| r["runId"].as_str().unwrap().to_owned()).find(|r| *r != id)
            {
                break o;
            }
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    };
    let rolled = orchestrix(&url, &["rollback", &other]).await;
    assert_eq!(rolled.status.code(), Some(0), "{rolled:?}");
    let out = tokio::time::timeout(30 * SECS, attached.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("paused at process-payment") && said.contains("orchestrix resume"),
        "{said}"
    );
    assert!(worker.lines_starting("Releasing stock for order order_9").is_empty());
    let rolled = orchestrix(&url, &["rollback", &id, "--by", "oncall"]).await;
    assert_eq!(rolled.status.code(), Some(0), "{rolled:?}");
    worker.wait_for_line("Releasing stock for order order_9", 10 * SECS).await;
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    let r = loop {
        let r = status_of(id.clone()).await;
        if r["status"] != "running" || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["actions"][0]["action"], "rollback");
    assert_eq!(r["actions"][0]["by"], "oncall");

    // Cancelled mid-run: ends `cancelled`; what ran is compensated.
    let id = start(r#"{"orderId":"order_10","amount":50,"userId":"user_Y"}"#).await;
    worker.wait_for_line("Reserving stock for order order_10", 10 * SECS).await;
    let cancelled =
        orchestrix(&url, &["cancel", &id, "--reason", "customer asked", "--wait"]).await;
    assert_eq!(cancelled.status.code(), Some(0), "{cancelled:?}");
    let text = stdout(&cancelled);
    assert!(text.contains(": cancelled in "), "{text}");
    assert!(text.contains("reserve-stock: compensated"), "{text}");
    assert!(text.contains("cancelled by "), "{text}");
    assert!(!text.contains("cancel by "), "the cause is said once: {text}");
    worker.wait_for_line("Releasing stock for order order_10", 10 * SECS).await;
    assert!(worker.lines_starting("Sending confirmation email to user user_Y").is_empty());
}

/// `auth config` refuses grants that would make a config nats-server
/// rejects, or that do not mean what they say; `--inbox-prefix` is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_config_refuses_grants_that_cannot_work() {
    let url = "nats://127.0.0.1:1";
    for (grants, says) in [
        (&["a:viewer", "a:operator"][..], "granted twice"),
        (&["a-b:viewer", "a_b:viewer"][..], "share the password variable"),
        (&["d:viewer:payment-flow"][..], "only workers and clients are limited to flows"),
        (&["w:worker"][..], "needs its flows"),
        (&["w:wroker:f"][..], "wroker"),
    ] {
        let mut args = vec!["auth", "config"];
        for g in grants {
            args.extend(["--grant", g]);
        }
        let out = orchestrix(url, &args).await;
        assert_eq!(out.status.code(), Some(2), "{grants:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{grants:?}: {err}");
    }
    let out = orchestrix(url, &["--inbox-prefix", "_INBOX_shop.", "list"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad inbox prefix"), "{out:?}");
}

/// A worker process with no log subscriber still shows its errors: a
/// command that is not one, published on its step's subject, is rejected
/// with a warning on stderr. `RUST_LOG` sets the level; nothing is installed
/// when the service opts out or has a subscriber of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_no_subscriber_reports_its_errors_on_stderr() {
    const WARNING: &str = "bad step command rejected";
    const STARTED: &str = "worker started"; // logged at `info`
    let server = NatsServer::start();
    let url = server.url();
    let nats = async_nats::connect(&url).await.unwrap();
    let subject = orchestrix_proto::Subjects::default().step("crash", "any", "a");
    /// Arguments, `RUST_LOG`, and which lines stderr and stdout show.
    type Case =
        (&'static [&'static str], Option<&'static str>, Vec<&'static str>, Vec<&'static str>);
    let cases: [Case; 4] = [
        (&[], None, vec![WARNING], vec![]),
        (&[], Some("orchestrix_worker=info"), vec![WARNING, STARTED], vec![]),
        (&["--no-default-logging"], None, vec![], vec![]),
        (&["--own-subscriber"], None, vec![], vec![WARNING, STARTED]),
    ];
    for (args, rust_log, on_stderr, on_stdout) in cases {
        let mut argv = vec!["--nats", url.as_str()];
        argv.extend_from_slice(args);
        let env: Vec<(&str, &str)> = rust_log.map(|l| ("RUST_LOG", l)).into_iter().collect();
        let mut worker =
            ChildProcess::spawn_capturing_stderr(&built("test_worker"), &argv, &env, &["RUST_LOG"]);
        worker.wait_for_line("ready ", 30 * SECS).await;
        // The reply shows the worker has dealt with it (and logged, if at all).
        let reply = tokio::time::timeout(10 * SECS, nats.request(subject.clone(), "oops".into()))
            .await
            .unwrap()
            .unwrap();
        assert!(!reply.payload.is_empty());
        worker.signal("TERM");
        assert_eq!(worker.wait(30 * SECS).await, Some(0), "{args:?}");
        // Its last lines may still be on their way through the pipes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (stderr, stdout) = (worker.stderr_lines().join("\n"), worker.lines().join("\n"));
        let what = format!("{args:?} RUST_LOG={rust_log:?}\nstderr:\n{stderr}\nstdout:\n{stdout}");
        for line in [WARNING, STARTED] {
            assert_eq!(stderr.contains(line), on_stderr.contains(&line), "{line}: {what}");
            assert_eq!(stdout.contains(line), on_stdout.contains(&line), "{line}: {what}");
        }
        let set = worker.lines().contains(&"subscriber set: true".to_owned());
        assert_eq!(set, args.is_empty() || args == ["--own-subscriber"], "{what}");
    }
}

/// The id of every live process whose parent is `parent`, from `/proc`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid == Some(parent) && state != Some("Z") {
            found.push(pid);
        }
    }
    found
}

/// Whether process `pid` has ended (a zombie nobody reaped has).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }
        Err(_) => true,
    }
}

/// `orchestrix dev` and its nats-server: the pid of the server, and the
/// directory it keeps its store in.
async fn dev() -> (ChildProcess, u16, u32, PathBuf) {
    let port = orchestrix_integration_tests::free_port();
    let dev = ChildProcess::spawn(&built("orchestrix"), &["dev", "--port", &port.to_string()]);
    dev.wait_for_line("NATS_URL=", 30 * SECS).await;
    let servers = children_of(dev.pid());
    assert_eq!(servers.len(), 1, "one nats-server: {servers:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", servers[0])).unwrap();
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let dir = args.iter().position(|a| a == "-sd").map(|i| PathBuf::from(&args[i + 1])).unwrap();
    assert!(dir.is_dir(), "{args:?}");
    (dev, port, servers[0], dir)
}

/// `orchestrix dev`'s nats-server ends with it: when it is stopped (and its
/// directory is removed), and when it is killed outright (`kill -9` runs no
/// destructor: the kernel kills the server, `PR_SET_PDEATHSIG`).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_nats_server_ends_with_orchestrix_dev() {
    let (mut stopped, _, server, dir) = dev().await;
    stopped.signal("TERM");
    assert_eq!(stopped.wait(30 * SECS).await, Some(0));
    assert!(ended(server), "nats-server {server} outlived `orchestrix dev`");
    assert!(!dir.exists(), "{} is left behind", dir.display());

    let (mut killed, _, server, dir) = dev().await;
    // Should the test fail, the server is not left running.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            if !ended(self.0) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &self.0.to_string()])
                    .status();
            }
        }
    }
    let _reap = Reap(server);
    killed.signal("KILL");
    killed.wait(10 * SECS).await;
    // Ended, it holds no socket; its port is not checked, as another test
    // running meanwhile may already have taken it.
    orchestrix_integration_tests::eventually(5 * SECS, "nats-server to end", || ended(server))
        .await;
    // Nothing ran to remove the directory of a killed `dev`.
    let _ = std::fs::remove_dir_all(dir);
}

/// A worker reads the NATS environment variables the CLI reads: a server
/// that wants a user and password takes `NATS_USER` / `NATS_PASSWORD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reads_nats_user_and_password_from_the_environment() {
    let server =
        NatsServer::start_with(["--user", "bob", "--pass", "pw1"].map(String::from).to_vec());
    let url = server.url();
    let worker = ChildProcess::spawn_with_env(
        &built("test_worker"),
        &["--nats", &url],
        &[("NATS_USER", "bob"), ("NATS_PASSWORD", "pw1")],
    );
    worker.wait_for_line("ready ", 30 * SECS).await;
}
