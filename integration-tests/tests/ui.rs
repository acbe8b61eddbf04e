//! The run browser (`orchestrix ui`) against a real coordinator, worker and
//! nats-server: its JSON API, its live events, its guards; and its page in a
//! real headless Chromium when one is installed (scripts/test.sh installs it).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, StepError, Worker, create};
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_coordinator::ui::{UiError, UiOptions, UiServer, serve};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use orchestrix_worker::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Payment {
    order: String,
    amount: u64,
    /// How long `process-payment` takes.
    slow_ms: u64,
}

/// The quick start's flow: a payment over 1000 is declined four times, and
/// its error carries markup (it must show as text). The payment of order
/// `held` waits until `gate` opens.
fn payment_flow(gate: watch::Receiver<bool>) -> orchestrix::Flow<Payment> {
    create::<Payment>("payment-flow")
        .step_with(
            "reserve-stock",
            |_ctx: StepContext<Payment>| async { Ok(()) },
            |o| o.compensate(|_ctx| async { Ok(()) }),
        )
        .step_with(
            "process-payment",
            move |ctx: StepContext<Payment>| {
                let mut gate = gate.clone();
                async move {
                    if ctx.input.order == "held" {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    tokio::time::sleep(Duration::from_millis(ctx.input.slow_ms)).await;
                    if ctx.input.amount > 1000 {
                        return Err(StepError::retryable(
                            "<script>alert('x')</script> Payment declined: limit exceeded",
                        ));
                    }
                    Ok(())
                }
            },
            |o| o.retries(3).retry_delay(20 * MS),
        )
        .step("send-email", |_ctx| async { Ok(()) })
}

struct Cluster {
    server: NatsServer,
    _node: Node,
    _worker: Worker,
    client: Client,
    gate: watch::Sender<bool>,
}

async fn cluster() -> Cluster {
    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let node = Node::builder()
        .bus_options(NatsBusOptions::default().ack_timeout(SECS))
        .store(NodeStore::Memory)
        .start(conn.clone())
        .await
        .unwrap();
    let (gate, held) = watch::channel(false);
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow(payment_flow(held))
        .start()
        .await
        .unwrap();
    let client = Client::new(conn, Subjects::default()).request_timeout(5 * SECS);
    // Served once a start is accepted.
    let deadline = tokio::time::Instant::now() + 20 * SECS;
    loop {
        let ping = Payment { order: "warm-up".into(), amount: 1, slow_ms: 0 };
        if client.run("payment-flow", &ping, RunOptions::new()).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the flow is never served");
        tokio::time::sleep(200 * MS).await;
    }
    Cluster { server, _node: node, _worker: worker, client, gate }
}

async fn browser(c: &Cluster, options: UiOptions) -> UiServer {
    let conn = NatsOptions::new(c.server.url()).connect().await.unwrap();
    let registry = Registry::open_existing(conn.clone(), "orchestrix").await.ok();
    let client = Client::new(conn, Subjects::default());
    serve(client, registry, options.listen(SocketAddr::from(([127, 0, 0, 1], 0)))).await.unwrap()
}

/// A request (a POST with the JSON body `{}`): the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let body = (method == "POST").then_some(("application/json", "{}"));
    exchange(addr, method, path, headers, body).await
}

/// A POST as a plain HTML form would send it.
async fn http_form(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    exchange(addr, "POST", path, headers, Some(("application/x-www-form-urlencoded", ""))).await
}

/// One HTTP/1.1 exchange with an optional (content type, body): the status
/// and the response body.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|h| h.starts_with("Host:")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    match body {
        Some((kind, text)) => req.push_str(&format!(
            "Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, &[]).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lists_runs_shows_a_rollback_and_streams_events() {
    let c = cluster().await;
    let ui = browser(&c, UiOptions::default()).await;
    let addr = ui.addr();
    let paid = Payment { order: "order_1".into(), amount: 50, slow_ms: 0 };
    let ok = c.client.run("payment-flow", &paid, RunOptions::new()).await.unwrap();
    let declined = Payment { order: "order_2".into(), amount: 2000, slow_ms: 0 };
    let failed = c.client.run("payment-flow", &declined, RunOptions::new()).await.unwrap();
    assert_eq!((ok.status, failed.status), (RunStatus::Completed, RunStatus::Failed));

    // The list, newest first, filtered, and paged by cursor.
    let all = json(addr, "/api/runs").await;
    let ids: Vec<&str> =
        all["runs"].as_array().unwrap().iter().map(|r| r["runId"].as_str().unwrap()).collect();
    assert_eq!(ids[..2], [failed.run_id.to_string(), ok.run_id.to_string()]);
    let only_failed = json(addr, "/api/runs?status=failed&flow=payment-flow").await;
    assert_eq!(only_failed["runs"].as_array().unwrap().len(), 1);
    let first = json(addr, "/api/runs?limit=1").await;
    let cursor = first["nextCursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, failed.run_id.to_string());
    let second = json(addr, &format!("/api/runs?limit=1&cursor={cursor}")).await;
    assert_eq!(second["runs"][0]["runId"], ok.run_id.to_string());

    // One run: four payment attempts, the stock released, the error as it was.
    let run = json(addr, &format!("/api/runs/{}", failed.run_id)).await;
    let steps = &run["run"]["steps"];
    assert_eq!(steps[1]["attempts"], 4);
    assert_eq!(steps[0]["status"], "compensated");
    assert!(steps[1]["error"].as_str().unwrap().starts_with("<script>"), "{run}");
    // Its timeline, from the events this browser saw.
    let lines: Vec<&str> =
        run["events"].as_array().unwrap().iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("process-payment: attempt")).count() >= 4,
        "{lines:?}"
    );
    let undo = lines.iter().position(|l| *l == "reserve-stock: compensating").unwrap();
    assert!(
        lines.iter().position(|l| l.starts_with("process-payment: failed for good")).unwrap()
            < undo
    );

    // Flows, with who serves them.
    let flows = json(addr, "/api/flows").await;
    assert_eq!(flows["flows"][0]["flow"], "payment-flow");
    assert_eq!(flows["flows"][0]["workers"].as_array().unwrap().len(), 1);

    // Bad input: a clear status and kind.
    let (status, body) = http(addr, "GET", "/api/runs/42", &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is not a run id"), "{body}");
    let (status, _) = http(addr, "GET", &format!("/api/runs/{}", uuid::Uuid::now_v7()), &[]).await;
    assert_eq!(status, 404);
    let (status, _) = http(addr, "GET", "/api/runs?status=bogus", &[]).await;
    assert_eq!(status, 400);
    // Actions are off unless asked for.
    let (status, body) = http(addr, "POST", &format!("/api/runs/{}/cancel", ok.run_id), &[]).await;
    assert_eq!(status, 403, "{body}");
    // Not reachable through another host name (DNS rebinding); errors are
    // JSON with a kind, unknown routes too.
    let (status, body) = http(addr, "GET", "/api/runs", &["Host: rebind.example:8233"]).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = http(addr, "GET", "/api/runs?limit=abc", &[]).await;
    assert_eq!((status, body.contains("\"kind\":\"bad_request\"")), (400, true), "{body}");
    let (status, body) = http(addr, "GET", "/nowhere", &[]).await;
    assert_eq!((status, body.contains("\"kind\":\"not_found\"")), (404, true), "{body}");

    // Live: an event of a run started after the stream opened arrives.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    // The response head first: the subscription is made by then.
    while let Some(l) = lines.next_line().await.unwrap() {
        if l.is_empty() {
            break;
        }
    }
    let later = Payment { order: "order_3".into(), amount: 5, slow_ms: 0 };
    let id = c.client.start("payment-flow", &later, RunOptions::new()).await.unwrap();
    let seen = tokio::time::timeout(10 * SECS, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(data) = l.strip_prefix("data: ") {
                let ev: Value = serde_json::from_str(data).unwrap();
                if ev["runId"] == id.to_string() {
                    return ev;
                }
            }
        }
        panic!("the stream ended")
    })
    .await
    .unwrap();
    assert_eq!(seen["flow"], "payment-flow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_everything_and_actions_need_their_flag() {
    let c = cluster().await;
    // Beyond loopback, no token: refused before listening.
    let conn = NatsOptions::new(c.server.url()).connect().await.unwrap();
    let open = UiOptions::default().listen(SocketAddr::from(([0, 0, 0, 0], 0)));
    let refused =
        serve(Client::new(conn.clone(), Subjects::default()), None, open).await.unwrap_err();
    assert!(matches!(refused, UiError::TokenRequired(_)), "{refused}");
    // A token that is guessed is no token.
    let weak = UiOptions::default().token("s3cret");
    let refused = serve(Client::new(conn, Subjects::default()), None, weak).await.unwrap_err();
    assert!(matches!(refused, UiError::WeakToken), "{refused}");

    let ui =
        browser(&c, UiOptions::default().token("s3cret-s3cret-s3cret").allow_actions(true)).await;
    let addr = ui.addr();
    for path in ["/", "/api/runs", "/assets/app.js"] {
        let (status, _) = http(addr, "GET", path, &[]).await;
        assert_eq!(status, 401, "{path}");
        let (status, _) = http(addr, "GET", path, &["Authorization: Bearer wrong"]).await;
        assert_eq!(status, 401, "{path}");
        let (status, _) =
            http(addr, "GET", path, &["Authorization: Bearer s3cret-s3cret-s3cret"]).await;
        assert_eq!(status, 200, "{path}");
    }
    // A browser: the token once in the URL (sent on without it), then a cookie.
    let (status, _) = http(addr, "GET", "/?token=s3cret-s3cret-s3cret", &[]).await;
    assert_eq!(status, 303);
    let (status, _) =
        http(addr, "GET", "/api/runs", &["Cookie: orchestrix_token=s3cret-s3cret-s3cret"]).await;
    assert_eq!(status, 200);

    // With the flag, an operator cancels a run mid-step from the API.
    let slow = Payment { order: "order_4".into(), amount: 5, slow_ms: 3_000 };
    let id = c.client.start("payment-flow", &slow, RunOptions::new()).await.unwrap();
    tokio::time::sleep(500 * MS).await;
    let auth = ["Authorization: Bearer s3cret-s3cret-s3cret"];
    // Never from another site: a foreign origin, or a body that is not JSON.
    let foreign = ["Authorization: Bearer s3cret-s3cret-s3cret", "Origin: https://evil.example"];
    let (status, body) = http(addr, "POST", &format!("/api/runs/{id}/cancel"), &foreign).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = http_form(addr, &format!("/api/runs/{id}/cancel"), &auth).await;
    assert_eq!(status, 403, "{body}");
    let own = [auth[0], &format!("Origin: http://{addr}")];
    let (status, body) = http(addr, "POST", &format!("/api/runs/{id}/cancel"), &own).await;
    assert_eq!(status, 200, "{body}");
    let report = c.client.wait(id).await.unwrap();
    assert_eq!(report.status, RunStatus::Cancelled, "{report}");
    assert_eq!(report.actions[0].by, "ui");
    // Cancelling twice is harmless; cancelling a completed run is a
    // conflict; an unknown action is not found.
    let (status, _) = http(addr, "POST", &format!("/api/runs/{id}/cancel"), &auth).await;
    assert_eq!(status, 200);
    let quick = Payment { order: "order_5".into(), amount: 5, slow_ms: 0 };
    let done = c.client.run("payment-flow", &quick, RunOptions::new()).await.unwrap();
    let (status, body) =
        http(addr, "POST", &format!("/api/runs/{}/cancel", done.run_id), &auth).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already finished"), "{body}");
    let (status, _) = http(addr, "POST", &format!("/api/runs/{id}/explode"), &auth).await;
    assert_eq!(status, 404);
}

/// The page in a real browser (headless Chromium driven by
/// `integration-tests/browser/ui.mjs`): the list shows a completed and a
/// failed run, the failed run's page shows four payment attempts and the
/// stock released after the failure, an error with markup is text, and a
/// run in flight turns completed without a reload. With
/// `ORCHESTRIX_UI_SCREENSHOTS=DIR` it saves the screenshots of docs/ui.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if std::env::var_os("ORCHESTRIX_SKIP_BROWSER").is_some() {
        eprintln!("ORCHESTRIX_SKIP_BROWSER is set: the page is not tested in a browser");
        return;
    }
    assert!(
        std::path::Path::new(&chromium).exists()
            && dir.join("node_modules/playwright-core").exists(),
        "the browser test needs Chromium at {chromium} and `npm ci` in {}: ./scripts/test.sh installs both",
        dir.display()
    );
    let c = cluster().await;
    let ui = browser(&c, UiOptions::default()).await;
    let paid = Payment { order: "order_1".into(), amount: 50, slow_ms: 0 };
    let ok = c.client.run("payment-flow", &paid, RunOptions::new()).await.unwrap();
    let declined = Payment { order: "order_2".into(), amount: 2000, slow_ms: 0 };
    let failed = c.client.run("payment-flow", &declined, RunOptions::new()).await.unwrap();
    let held = Payment { order: "held".into(), amount: 10, slow_ms: 0 };
    let live = c.client.start("payment-flow", &held, RunOptions::new()).await.unwrap();

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(dir.join("ui.mjs"))
        .arg(format!("http://{}", ui.addr()))
        .args([ok.run_id.to_string(), failed.run_id.to_string(), live.to_string()])
        .env("CHROMIUM", &chromium)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(shots) = std::env::var_os("ORCHESTRIX_UI_SCREENSHOTS") {
        cmd.arg(shots);
    }
    let mut node = cmd.spawn().expect("node runs (Node.js is needed for the browser test)");
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    let checks = tokio::time::timeout(120 * SECS, async {
        while let Some(line) = out.next_line().await.unwrap() {
            if line == "LET-IT-FINISH" {
                c.gate.send(true).unwrap();
            }
            said.push(line);
        }
        node.wait().await.unwrap()
    })
    .await
    .unwrap();
    let said = said.join("\n");
    assert!(checks.success(), "{said}");
    for check in [
        "ok the list shows a completed and a failed run",
        "ok the failed run: 4 payment attempts, reserve-stock compensated after the failure",
        "ok an error with markup is shown as text",
        "ok a run in flight turns completed without a reload",
    ] {
        assert!(said.contains(check), "{check}: {said}");
    }
}

/// The binary: `serve --http` serves the browser beside the coordinator, and
/// `ui` refuses to listen beyond loopback without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_it_and_refuses_an_open_address_without_a_token() {
    use orchestrix_integration_tests::{ChildProcess, built, free_port};
    let server = NatsServer::start();
    let url = server.url();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _serve = ChildProcess::spawn(
        &built("orchestrix"),
        &["--nats", &url, "serve", "--store", "memory", "--http", &listen],
    );
    let addr: SocketAddr = listen.parse().unwrap();
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (status, body) = http(addr, "GET", "/api/runs", &[]).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"runs\":[]"), "{body}");
            let (status, page) = http(addr, "GET", "/", &[]).await;
            assert_eq!(status, 200);
            assert!(page.contains("/assets/app.js"), "{page}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "serve --http never listened");
        tokio::time::sleep(100 * MS).await;
    }
    let open = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url, "ui", "--listen", "0.0.0.0:0"])
        .env_remove("ORCHESTRIX_UI_TOKEN")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert_eq!(open.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a loopback address: give the browser a token"), "{stderr}");
    // `serve --http` refuses it before it connects (no NATS at this address)
    // and before its coordinator could take runs over.
    let stderr = serve_http_refused("0.0.0.0:0").await;
    assert!(stderr.contains("is not a loopback address: give the browser a token"), "{stderr}");
    // And an address already taken, the same way.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = serve_http_refused(&addr).await;
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

/// `orchestrix serve --http listen` with no NATS to reach: it must stop
/// with a usage error (exit 2) before it tries; returns what it said.
async fn serve_http_refused(listen: &str) -> String {
    let refused = tokio::process::Command::new(orchestrix_integration_tests::built("orchestrix"))
        .args(["--nats", "nats://127.0.0.1:1", "serve", "--http", listen])
        .env_remove("ORCHESTRIX_UI_TOKEN")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    stderr
}
