//! NATS scenarios: the saga over NATS beside its floor, raw NATS doing the
//! same message pattern on the same server, measured in the same run.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix::coordinator::flowfile;
use orchestrix::coordinator::nats::{Node, NodeStore};
use orchestrix::proto::Subjects;
use orchestrix::{NatsOptions, RunOptions, RunStatus, StepContext, Worker};

use crate::{Args, Figure, measure};

const FLOW: &str = r#"
[[flow]]
name = "bench"
[[flow.step]]
name = "one"
[[flow.step]]
name = "two"
[[flow.step]]
name = "three"

# Runs parked over NATS: "wait" fails once, retryably, then waits an hour.
[[flow]]
name = "bench-park"
[[flow.step]]
name = "one"
[[flow.step]]
name = "wait"
retries = 1
retry_delay_ms = 3600000
max_delay_ms = 3600000
[[flow.step]]
name = "three"

# The same three steps, the last two in a parallel group.
[[flow]]
name = "bench-par"
[[flow.step]]
name = "one"
[[flow.step]]
name = "two"
group = "fan"
[[flow.step]]
name = "three"
group = "fan"
"#;

const ECHO: &str = "bench.echo";

/// The benchmark's subject prefix, and so its buckets' (`bench_runs`, …):
/// apart from any coordinator of a real deployment on the same NATS.
const PREFIX: &str = "bench";

/// A coordinator node serving the bench flow as `orchestrix serve` would,
/// from its definition (no registry), publishing no run events, and
/// recording its run metrics (a no-op unless `--traced` set up a meter
/// provider).
async fn node(conn: async_nats::Client, store: NodeStore) -> Result<Node, String> {
    Node::builder()
        .subjects(Subjects::new(PREFIX).map_err(|e| e.to_string())?)
        .hooks(orchestrix::coordinator::metrics::RunMetrics::global())
        .store(store)
        .flows(flowfile::parse(FLOW).map_err(|e| e.to_string())?)
        .registry(false)
        .events(false)
        .start(conn)
        .await
        .map_err(|e| e.to_string())
}

/// The scenarios over NATS with runs in memory.
pub(crate) const SCENARIOS: [&str; 4] =
    ["nats-floor-chain3", "saga-nats-memory", "saga-nats-memory-1t", "saga-nats-parallel"];

/// The durable ones (`durable`).
pub(crate) const DURABLE_SCENARIOS: [&str; 5] = [
    "nats-floor-durable",
    "saga-nats-jetstream-1c",
    "saga-nats-jetstream-2c",
    "saga-nats-jetstream-1c-1t",
    "saga-nats-jetstream-parked",
];

/// One run of `flow` to its end, which must be a success.
async fn one_run(coordinator: orchestrix::Coordinator, flow: &'static str) {
    let r = coordinator.run(flow, &1u64, RunOptions::new()).await.expect("run");
    assert_eq!(r.status, RunStatus::Completed, "{r}");
}

/// Kills the child processes (server, worker) when the scenarios end; then
/// the server's store dir goes.
struct Children(Vec<Child>, Option<tempfile::TempDir>);

impl Drop for Children {
    fn drop(&mut self) {
        // The worker process ends when its stdin closes: given a moment to,
        // so that a profiler it runs under (valgrind's callgrind, say) can
        // write out its figures; the server is only killed, last (the
        // worker's shutdown needs it).
        for c in self.0.iter_mut().rev() {
            if c.stdin.take().is_some() {
                let give_up = std::time::Instant::now() + Duration::from_secs(10);
                while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) async fn run(args: &Args, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<Figure>, String> {
    let mut children = Children(Vec::new(), None);
    let url = match &args.nats {
        Some(u) => u.clone(),
        None => {
            let (child, url, dir) = start_server(args.sync_always)?;
            crate::count_cpu_of(child.id(), "nats_server");
            children.0.push(child);
            children.1 = Some(dir);
            url
        }
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut worker = Command::new(exe);
    worker.args(["--worker", &url]);
    if let Some(sink) = &args.trace_to {
        worker.args(["--trace-to", sink]);
    }
    let worker = worker
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the worker process: {e}"))?;
    crate::count_cpu_of(worker.id(), "worker");
    children.0.push(worker);
    let client = NatsOptions::new(url.clone()).connect().await.map_err(|e| e.to_string())?;
    wait_for_worker(&client).await?;

    let mut out = Vec::new();
    for concurrency in args.concurrencies(64) {
        if wanted("nats-floor-chain3") {
            let c = client.clone();
            out.push(
                measure("nats-floor-chain3", concurrency, args.seconds, move || {
                    let c = c.clone();
                    async move {
                        for _ in 0..3 {
                            c.request(ECHO, Bytes::from_static(b"x")).await.expect("echo");
                        }
                    }
                })
                .await,
            );
        }
        // The sequential flow, and the same steps with the last two in a group.
        for (scenario, flow) in [("saga-nats-memory", "bench"), ("saga-nats-parallel", "bench-par")]
        {
            if !wanted(scenario) {
                continue;
            }
            let node = node(client.clone(), NodeStore::Memory).await?;
            let coordinator = node.coordinator().clone();
            out.push(
                measure(scenario, concurrency, args.seconds, move || {
                    one_run(coordinator.clone(), flow)
                })
                .await,
            );
            node.shutdown().await;
        }
        if wanted("saga-nats-memory-1t") {
            let figure =
                on_one_thread(&url, "saga-nats-memory-1t", concurrency, args.seconds, || {
                    NodeStore::Memory
                });
            out.push(figure.await?);
        }
    }
    if DURABLE_SCENARIOS.iter().any(|n| wanted(n)) {
        out.extend(durable(args, wanted, &url, &client).await?);
    }
    Ok(out)
}

/// Measures the sequential flow with the coordinator node on an actix
/// system of its own, one thread: the node's NATS connection, its tasks,
/// every run's actor and the loops that start the runs all live there (a
/// service that embeds the node in an actix-web app and starts runs from its
/// handlers), where the other scenarios leave the node's tasks on the tokio
/// runtime and its runs on the engine's arbiters, one per core, which hand
/// every reply and command across threads.
async fn on_one_thread(
    url: &str,
    scenario: &'static str,
    concurrency: usize,
    seconds: f64,
    store: impl FnOnce() -> NodeStore + Send + 'static,
) -> Result<Figure, String> {
    let url = url.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-node".into())
        .spawn(move || {
            let figure = actix_rt::System::new().block_on(async move {
                let conn = NatsOptions::new(url).connect().await.map_err(|e| e.to_string())?;
                let node = node(conn, store()).await?;
                let coordinator = node.coordinator().clone();
                let figure = measure(scenario, concurrency, seconds, move || {
                    one_run(coordinator.clone(), "bench")
                })
                .await;
                node.shutdown().await;
                Ok::<_, String>(figure)
            });
            let _ = tx.send(figure);
        })
        .map_err(|e| format!("cannot start the node's thread: {e}"))?;
    rx.await.map_err(|_| "the node's thread ended without a figure".to_owned())?
}

/// The same flow with its runs in JetStream KV, beside a floor doing the same
/// messages and KV writes by hand: 3 request-replies and the 7 writes a
/// 3-step run makes (4 record writes, then final record, history, delete).
async fn durable(
    args: &Args,
    wanted: &dyn Fn(&str) -> bool,
    url: &str,
    client: &async_nats::Client,
) -> Result<Vec<Figure>, String> {
    use orchestrix::coordinator::jetstream::JetStreamStoreOptions;
    let mut out = Vec::new();
    let js = async_nats::jetstream::new(client.clone());
    let sync = if args.sync_always { "-sync-always" } else { "" };
    let floor_name: &'static str = Box::leak(format!("nats-floor-durable{sync}").into_boxed_str());
    let saga_name: &'static str = Box::leak(format!("saga-nats-jetstream{sync}").into_boxed_str());
    for concurrency in args.concurrencies(64) {
        if wanted("nats-floor-durable") {
            let floor_kv = js
                .create_or_update_key_value(async_nats::jetstream::kv::Config {
                    bucket: "bench_floor".into(),
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let (c, kv) = (client.clone(), floor_kv.clone());
            out.push(
                measure(floor_name, concurrency, args.seconds, move || {
                    let (c, kv) = (c.clone(), kv.clone());
                    async move {
                        let key = uuid::Uuid::new_v4().simple().to_string();
                        let record = Bytes::from(vec![0u8; 300]);
                        kv.put(&key, record.clone()).await.expect("kv");
                        for _ in 0..3 {
                            c.request(ECHO, Bytes::from_static(b"x")).await.expect("echo");
                            kv.put(&key, record.clone()).await.expect("kv");
                        }
                        kv.put(&key, record.clone()).await.expect("kv");
                        kv.put(format!("h{key}"), record.clone()).await.expect("kv");
                        kv.delete(&key).await.expect("kv");
                    }
                })
                .await,
            );
            settle(&js).await;
        }
        // Two coordinators sharing the runs only at c = 64: at c = 1 the
        // second has nothing to do.
        let fleet: &[usize] = if concurrency == 1 { &[1] } else { &[1, 2] };
        for &coordinators in fleet {
            if !wanted(&format!("saga-nats-jetstream-{coordinators}c")) {
                continue;
            }
            let mut nodes = Vec::new();
            for _ in 0..coordinators {
                let conn = NatsOptions::new(url).connect().await.map_err(|e| e.to_string())?;
                let store = NodeStore::JetStream(JetStreamStoreOptions::default().prefix(PREFIX));
                nodes.push(node(conn, store).await?);
            }
            let cs: Vec<_> = nodes.iter().map(|n| n.coordinator().clone()).collect();
            let name: &'static str =
                Box::leak(format!("{saga_name}-{coordinators}c").into_boxed_str());
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            out.push(
                measure(name, concurrency, args.seconds, move || {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % cs.len();
                    one_run(cs[i].clone(), "bench")
                })
                .await,
            );
            for n in nodes {
                n.shutdown().await;
            }
            settle(&js).await;
        }
        if wanted("saga-nats-jetstream-1c-1t") {
            let name: &'static str = Box::leak(format!("{saga_name}-1c-1t").into_boxed_str());
            let store = || NodeStore::JetStream(JetStreamStoreOptions::default().prefix(PREFIX));
            out.push(on_one_thread(url, name, concurrency, args.seconds, store).await?);
            settle(&js).await;
        }
    }
    if wanted("saga-nats-jetstream-parked") {
        out.push(parked_durable(args, url).await?);
    }
    Ok(out)
}

/// Deletes every stream a measurement left and lets the server settle: the
/// next measurement must not pay for the last one's compactions and flushes.
async fn settle(js: &async_nats::jetstream::Context) {
    let names: Vec<String> = js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
    for name in names {
        let _ = js.delete_stream(&name).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Resident memory per run parked over NATS + JetStream: `--parked` runs
/// started and left in a one-hour retry delay of their second step, their
/// records checkpointed to the runs bucket; the growth of this process's
/// resident memory (the coordinator, its NATS client and store) per run.
async fn parked_durable(args: &Args, url: &str) -> Result<Figure, String> {
    use orchestrix::coordinator::jetstream::JetStreamStoreOptions;
    let conn = NatsOptions::new(url).connect().await.map_err(|e| e.to_string())?;
    let store = NodeStore::JetStream(JetStreamStoreOptions::default().prefix(PREFIX));
    let node = node(conn, store).await?;
    let c = node.coordinator().clone();
    let parked = |c: orchestrix::Coordinator, id: orchestrix::RunId| async move {
        loop {
            let s = c.status(id).await.map_err(|e| e.to_string())?;
            if s.is_some_and(|s| s.steps.get(1).is_some_and(|st| st.attempts >= 1)) {
                return Ok::<_, String>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Warm-up: threads, pools and buffers, not counted.
    let mut last = None;
    for i in 0..1000u64 {
        last = Some(c.start("bench-park", &i, RunOptions::new()).await.map_err(|e| e.to_string())?);
    }
    if let Some(h) = last {
        parked(c.clone(), h.run_id()).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = crate::resident_bytes();
    let started = std::time::Instant::now();
    let n = args.parked;
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            for i in (t..n as u64).step_by(64) {
                let h = c.start("bench-park", &i, RunOptions::new()).await.expect("start");
                last = Some(h.run_id());
            }
            last
        }));
    }
    let mut lasts = Vec::new();
    for t in tasks {
        if let Some(id) = t.await.map_err(|e| e.to_string())? {
            lasts.push(id);
        }
    }
    for id in lasts {
        parked(c.clone(), id).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Checkpoints done and the journal purged: what stays is what a parked run costs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held = crate::resident_bytes().saturating_sub(before) as f64;
    node.shutdown().await;
    let name = if args.sync_always {
        "saga-nats-jetstream-sync-always-parked"
    } else {
        "saga-nats-jetstream-parked"
    };
    Ok(Figure::parked(name, n, elapsed, held))
}

async fn wait_for_worker(client: &async_nats::Client) -> Result<(), String> {
    for _ in 0..200 {
        if client.request(ECHO, Bytes::from_static(b"ping")).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the worker process did not come up".into())
}

fn start_server(sync_always: bool) -> Result<(Child, String, tempfile::TempDir), String> {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(dir.path());
    if sync_always {
        // fsync before every acknowledgement.
        let conf = dir.path().join("sync.conf");
        std::fs::write(&conf, "jetstream { sync_interval: always }\n")
            .map_err(|e| e.to_string())?;
        cmd.arg("-c").arg(&conf);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {bin}: {e} (set NATS_SERVER_BIN or pass --nats)"))?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((child, format!("nats://127.0.0.1:{port}"), dir));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err("nats-server did not start".into())
}

/// The worker process: the three no-op steps, and an echo responder for the floor.
pub(crate) fn worker_process(url: &str, trace_to: Option<&str>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let _telemetry = trace_to.map(|sink| {
            orchestrix::telemetry::init_with(
                "orchestrix-bench-worker",
                "warn",
                Some(crate::export(sink)),
            )
        });
        let client = NatsOptions::new(url).connect().await.expect("worker connects");
        let mut echo = client.subscribe(ECHO).await.expect("echo subscription");
        let responder = client.clone();
        tokio::spawn(async move {
            while let Some(msg) = echo.next().await {
                if let Some(reply) = msg.reply {
                    let _ = responder.publish(reply, msg.payload).await;
                }
            }
        });
        let worker = Worker::builder()
            .client(client)
            .prefix(PREFIX)
            .concurrency(256)
            .steps::<u64>("bench", |f| {
                f.step("one", |_: StepContext<u64>| async { Ok(()) })
                    .step("two", |_| async { Ok(()) })
                    .step("three", |_| async { Ok(()) })
            })
            .steps::<u64>("bench-park", |f| {
                f.step("one", |_: StepContext<u64>| async { Ok(()) })
                    .step("wait", |_| async { Err::<(), _>(orchestrix::StepError::retryable("later")) })
                    .step("three", |_| async { Ok(()) })
            })
            .steps::<u64>("bench-par", |f| {
                f.step("one", |_: StepContext<u64>| async { Ok(()) })
                    .step("two", |_| async { Ok(()) })
                    .step("three", |_| async { Ok(()) })
            })
            .start()
            .await
            .expect("worker starts");
        // The bench holds our stdin: when it ends, so do we, even if it was killed.
        tokio::select! {
            _ = tokio::task::spawn_blocking(|| std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1])) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        worker.shutdown().await;
    });
}
