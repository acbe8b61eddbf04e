//! Least privilege, proven against a real nats-server with one user per
//! role (the config `orchestrix auth config` writes): every refusal below is
//! the server's, observed on the refused connection.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use orchestrix::{Client, RunOptions, RunStatus, StepContext, Worker, create};
use orchestrix_coordinator::auth::{Role, User, server_config};
use orchestrix_coordinator::nats::{Node, NodeError};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::registry::Registry;
use orchestrix_worker::{NatsOptions, WorkerError, check_permissions};

const SECS: Duration = Duration::from_secs(1);

fn users() -> Vec<User> {
    let fa = || vec!["fa".to_string()];
    vec![
        User::new("coord", Role::Coordinator, vec![]).password("c-pw"),
        User::new("worker-a", Role::Worker, fa()).password("wa-pw"),
        User::new("client-a", Role::Client, fa()).password("ca-pw"),
        User::new("viewer", Role::Viewer, vec![]).password("v-pw"),
        User::new("ops", Role::Operator, vec![]).password("o-pw"),
    ]
}

fn as_user(server: &NatsServer, user: &str, password: &str) -> NatsOptions {
    NatsOptions::new(server.url())
        .user_password(user, password)
        .inbox_prefix(format!("_INBOX_{user}"))
}

fn flow(name: &str) -> orchestrix::Flow<u32> {
    create::<u32>(name).step_with(
        "s",
        |ctx: StepContext<u32>| async move { Ok(ctx.input + 1) },
        |o| o.compensate(|_ctx| async { Ok(()) }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_its_job_and_nothing_else() {
    let server = NatsServer::start_with_config(&server_config("orchestrix", &users()));

    // The coordinator, on its own credentials, starts (it creates the buckets).
    let conn = as_user(&server, "coord", "c-pw").connect().await.unwrap();
    let node = Node::builder().start(conn).await.unwrap();

    // A worker of flow `fa` serves and registers `fa`.
    let wa = Worker::builder()
        .nats(as_user(&server, "worker-a", "wa-pw"))
        .flow(flow("fa"))
        .start()
        .await
        .unwrap();
    // … but may not receive flow `fb`'s commands: refused at start, by name.
    let err = Worker::builder()
        .nats(as_user(&server, "worker-a", "wa-pw"))
        .steps::<u32>("fb", |f| f.step("s", |_ctx| async { Ok(()) }))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::Permission(_)), "{err:?}");
    assert!(err.to_string().contains("orchestrix.step.fb"), "{err}");
    // … nor register (or change) flow `fb`.
    let err = Worker::builder()
        .nats(as_user(&server, "worker-a", "wa-pw"))
        .flow(flow("fb"))
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("$KV.orchestrix_flows.fb"), "{err}");
    let conn = as_user(&server, "worker-a", "wa-pw").connect().await.unwrap();
    // (Read back as a viewer: a worker may read its own flows' keys only.)
    let viewer_conn = as_user(&server, "viewer", "v-pw").connect().await.unwrap();
    let registry = Registry::open_existing(viewer_conn, "orchestrix").await.unwrap();
    let flows = || async {
        let regs = registry.registrations().await.unwrap();
        regs.iter().map(|r| r.flow.name.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(flows().await, ["fa"]);
    // … nor wipe the registry through a key it may write: a rollup there
    // would erase every flow's registration (the coordinator turned rollups
    // off on the flows bucket).
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let js = async_nats::jetstream::new(conn.clone());
    let acked =
        match js.publish_with_headers("$KV.orchestrix_flows.fa.x", headers, Bytes::new()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
    assert!(!acked, "a rollup on the flows bucket was accepted");
    assert_eq!(flows().await, ["fa"], "the registration survives");

    // A client of `fa` runs `fa`.
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    let conn = as_user(&server, "client-a", "ca-pw").connect().await.unwrap();
    let client = Client::new(conn.clone(), Subjects::default()).request_timeout(2 * SECS);
    let report = loop {
        match client.run("fa", &1u32, RunOptions::new()).await {
            Ok(r) => break r,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    // … but may not publish outcomes, read step commands, or start `fb`.
    conn.publish("orchestrix.reply.x", Bytes::from_static(b"forged")).await.unwrap();
    let _sub = conn.subscribe("orchestrix.step.>").await.unwrap();
    let err = client.start("fb", &1u32, RunOptions::new()).await.unwrap_err();
    assert!(matches!(err, orchestrix::ClientError::Permission(_)), "{err:?}");
    assert!(err.to_string().contains("orchestrix.run.fb"), "{err}");
    let refused = check_permissions(&conn).await.unwrap_err();
    for subject in ["orchestrix.reply.x", "orchestrix.step.>", "orchestrix.run.fb"] {
        assert!(refused.contains(subject), "{subject} not refused: {refused}");
    }
    // … nor start `fb` by naming it in a request sent on `fa`'s subject,
    // which the server lets through: the coordinator refuses it.
    let input = orchestrix_proto::Payload::encode(&1u32).unwrap();
    let sneaky = orchestrix_proto::RunRequest {
        wait: true,
        ..orchestrix_proto::RunRequest::new("fb", input)
    };
    let answer = conn
        .request("orchestrix.run.fa", Bytes::from(orchestrix_proto::encode(&sneaky).unwrap()))
        .await
        .unwrap();
    match orchestrix_proto::decode::<orchestrix_proto::RunReply>(&answer.payload).unwrap() {
        orchestrix_proto::RunReply::Rejected { code, error, .. } => {
            assert_eq!(code, orchestrix_proto::RunReply::CODE_BAD_REQUEST, "{error}");
            assert!(error.contains("names flow `fb`"), "{error}");
        }
        other => panic!("a start of `fb` on `fa`'s subject was not refused: {other:?}"),
    }

    // A viewer lists runs, but starts and cancels nothing.
    let conn = as_user(&server, "viewer", "v-pw").connect().await.unwrap();
    let viewer = Client::new(conn.clone(), Subjects::default()).request_timeout(SECS);
    assert_eq!(viewer.status(report.run_id).await.unwrap().status, RunStatus::Completed);
    let _ = viewer.start("fa", &1u32, RunOptions::new()).await;
    let _ = viewer.cancel(report.run_id, "viewer", None).await;
    let refused = check_permissions(&conn).await.unwrap_err();
    for subject in ["orchestrix.run.fa", "orchestrix.control"] {
        assert!(refused.contains(subject), "{subject} not refused: {refused}");
    }
    // An operator may act on runs (this one finished: refused by the
    // coordinator, not by the server).
    let conn = as_user(&server, "ops", "o-pw").connect().await.unwrap();
    let ops = Client::new(conn.clone(), Subjects::default()).request_timeout(2 * SECS);
    let err = ops.cancel(report.run_id, "ops", None).await.unwrap_err();
    assert!(err.to_string().contains("already finished"), "{err}");
    check_permissions(&conn).await.unwrap();

    // A coordinator reaches its own prefix's streams only, not another tenant's.
    let conn = as_user(&server, "coord", "c-pw").connect().await.unwrap();
    let _ = async_nats::jetstream::new(conn.clone()).get_key_value("other_runs").await;
    let refused = check_permissions(&conn).await.unwrap_err();
    assert!(refused.contains("KV_other_runs"), "{refused}");

    // A coordinator on a worker's credentials fails at start, naming what it lacks.
    let conn = as_user(&server, "worker-a", "wa-pw").connect().await.unwrap();
    let err = Node::builder().start(conn).await.unwrap_err();
    assert!(matches!(err, NodeError::Permission(_)), "{err}");
    wa.shutdown().await;
    drop(node);
}

/// The quick start, every component on its least-privilege credentials,
/// over TLS: `orchestrix auth config` writes the server's users, and
/// `orchestrix serve`, the example worker and `orchestrix run` each connect
/// as their own user, trusting the server's CA (`NATS_CA`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_runs_with_every_component_on_its_own_credentials() {
    use orchestrix_integration_tests::{ChildProcess, built};
    let config = tokio::process::Command::new(built("orchestrix"))
        .args([
            "auth",
            "config",
            "--grant",
            "coord:coordinator",
            "--grant",
            "pay:worker:payment-flow",
        ])
        .args(["--grant", "shop:client:payment-flow"])
        .output()
        .await
        .unwrap();
    assert_eq!(config.status.code(), Some(0), "{config:?}");
    let config = String::from_utf8(config.stdout).unwrap();
    assert!(config.contains("password: $COORD_PASSWORD"), "{config}");
    // The passwords, as nats-server would read them from its environment.
    let config = config
        .replace("$COORD_PASSWORD", "\"c\"")
        .replace("$PAY_PASSWORD", "\"p\"")
        .replace("$SHOP_PASSWORD", "\"s\"");
    let certs = tempfile::tempdir().unwrap();
    // The development CA and certificate, as the doc makes them.
    let out = tokio::process::Command::new(built("orchestrix"))
        .args(["auth", "certs", "--out"])
        .arg(certs.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let [ca, cert, key] = ["ca.pem", "server.pem", "server-key.pem"].map(|f| certs.path().join(f));
    let config = format!(
        "{config}\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        cert.display(),
        key.display()
    );
    let server = NatsServer::start_with_config(&config);
    let url = |user: &str, pw: &str| format!("tls://{user}:{pw}@127.0.0.1:{}", server.port());
    let ca = ca.display().to_string();
    let _coordinator = ChildProcess::spawn_with_env(
        &built("orchestrix"),
        &["--nats", &url("coord", "c"), "serve"],
        &[("NATS_INBOX_PREFIX", "_INBOX_coord"), ("NATS_CA", &ca)],
    );
    // Under least privilege the coordinator creates the buckets: it starts first.
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let out = tokio::process::Command::new(built("orchestrix"))
            .args(["--nats", &url("shop", "s"), "status", "00000000-0000-0000-0000-000000000000"])
            .env("NATS_INBOX_PREFIX", "_INBOX_shop")
            .env("NATS_CA", &ca)
            .output()
            .await
            .unwrap();
        if String::from_utf8_lossy(&out.stderr).contains("unknown run") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let worker = ChildProcess::spawn_with_env(
        &built("examples/payment_worker"),
        &["--nats", &url("pay", "p")],
        &[("NATS_INBOX_PREFIX", "_INBOX_pay"), ("NATS_CA", &ca)],
    );
    worker.wait_for_line("worker ", 30 * SECS).await;
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        let out = tokio::process::Command::new(built("orchestrix"))
            .args(["--nats", &url("shop", "s"), "run", "payment-flow", "--json", "--input"])
            .arg(r#"{"orderId":"order_1","amount":50,"userId":"user_A"}"#)
            .env("NATS_INBOX_PREFIX", "_INBOX_shop")
            .env("NATS_CA", &ca)
            .output()
            .await
            .unwrap();
        if out.status.code() == Some(0) {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["status"], "completed");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The client's user may not register flows or read the registry's writes.
    let out = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url("shop", "s"), "flows", "apply"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/payment-flow.toml"))
        .env("NATS_INBOX_PREFIX", "_INBOX_shop")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Without the CA, nobody connects.
    let out = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url("shop", "s"), "status", "00000000-0000-0000-0000-000000000000"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to NATS"), "{err}");
    assert!(err.contains("NATS_CA"), "the error says what to do: {err}");
    assert!(!err.contains(":s@") && err.contains("shop:<redacted>@"), "password shown: {err}");
    // Without its reply prefix, the client is told why no answer can come,
    // and that the run may have started (the coordinator got the request).
    let out = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url("shop", "s"), "run", "payment-flow", "--input"])
        .arg(r#"{"orderId":"order_2","amount":50,"userId":"user_A"}"#)
        .env("NATS_CA", &ca)
        .output()
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NATS_INBOX_PREFIX=_INBOX_<user>"), "{err}");
    assert!(err.contains("may have"), "{err}");
}
