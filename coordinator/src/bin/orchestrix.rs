//! `orchestrix`: the coordinator service and its command line.
//!
//! Exit codes: 0 the run completed (or the command succeeded), 1 the run ended
//! failed or compensation_failed, 2 usage, configuration or connection errors.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use orchestrix_coordinator::jetstream::JetStreamStoreOptions;
use orchestrix_coordinator::nats::{Client, NatsBusOptions, Node, NodeStore};
use orchestrix_coordinator::{ListFilter, RunOptions, RunReport, RunStatus, flowfile};
use orchestrix_proto::{ControlAction, Payload, Subjects};
use orchestrix_worker::registry::{Registry, RegistryError, serves};
use orchestrix_worker::{NatsOptions, wait_for_signal};
use tracing::info;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "orchestrix",
    version,
    about = "Distributed sagas over NATS: the coordinator and its CLI"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix shared by coordinators, workers and clients.
    #[arg(long, global = true, env = "ORCHESTRIX_PREFIX", default_value = Subjects::DEFAULT_PREFIX)]
    prefix: String,
    /// NATS user (with --password).
    #[arg(long, global = true, env = "NATS_USER", requires = "password")]
    user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// NATS token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, global = true, env = "NATS_CREDS")]
    creds: Option<PathBuf>,
    /// Root certificate to trust (PEM); implies TLS.
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl NatsArgs {
    fn options(&self) -> NatsOptions {
        let mut o = NatsOptions::new(self.nats.clone());
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            o = o.user_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(c) = &self.creds {
            o = o.credentials_file(c.clone());
        }
        if let Some(ca) = &self.tls_ca {
            o = o.tls_root_certificate(ca.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            o = o.tls_client_certificate(c.clone(), k.clone());
        }
        o
    }

    fn subjects(&self) -> anyhow::Result<Subjects> {
        Subjects::new(&self.prefix).map_err(|e| anyhow!("bad --prefix: {e}"))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator: serve the flows workers register (and those of a flow file).
    Serve(ServeArgs),
    /// The flow registry: apply flow files, list flows, versions and workers.
    #[command(subcommand)]
    Flows(FlowsCommand),
    /// Start a run and print its report.
    Run {
        /// Flow name.
        flow: String,
        /// The run's input, as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// Run this version of the flow (default: the newest one a live worker serves).
        #[arg(long = "flow-version")]
        version: Option<String>,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        /// How long the key outlives its run (e.g. 1h, 30m).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Deadline of the whole run (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Print the run id and return at once.
        #[arg(long)]
        detach: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a run's report so far.
    Status {
        /// The run's id.
        run_id: Uuid,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: stop its step in flight, compensate what completed, end it `cancelled`.
    Cancel {
        /// The run's id.
        run_id: Uuid,
        /// Why (recorded in the run's report).
        #[arg(long)]
        reason: Option<String>,
        /// Who (recorded in the run's report; default: `$USER@host`).
        #[arg(long)]
        by: Option<String>,
        /// Wait for the run to finish and print its report.
        #[arg(long)]
        wait: bool,
    },
    /// Resume a paused run: retry its paused step with a fresh budget of attempts.
    Resume {
        /// The run's id.
        run_id: Uuid,
        /// Who (recorded in the run's report; default: `$USER@host`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Roll a paused run back: its paused step fails for good and the rollback goes on.
    Rollback {
        /// The run's id.
        run_id: Uuid,
        /// Who (recorded in the run's report; default: `$USER@host`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Follow a run's events live, then print its report.
    Watch {
        /// The run's id.
        run_id: Uuid,
        /// Print events and the report as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List recent runs, newest first.
    List {
        /// Only runs in this status (running, completed, failed, compensation_failed, quarantined).
        #[arg(long, value_parser = parse_status)]
        status: Option<RunStatus>,
        /// Only runs of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Try it out: start a local nats-server (JetStream, temp dir, free port) and a coordinator.
    Dev {
        /// A flow file to serve as well as the flows workers register.
        #[arg(long)]
        flows: Option<PathBuf>,
        /// Port for NATS (default: a free one).
        #[arg(long)]
        port: Option<u16>,
    },
}

#[derive(Subcommand, Debug)]
enum FlowsCommand {
    /// Register the flows of a TOML file (for workers in other languages).
    Apply {
        /// The flow file.
        file: PathBuf,
        /// Replicas of the registry buckets if they do not exist yet.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// List the registered flows, their versions and the live workers serving each.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every version of one flow: steps, policies, workers.
    Show {
        /// Flow name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A flow file (TOML) with flows to serve besides those workers register.
    #[arg(long, env = "ORCHESTRIX_FLOWS")]
    flows: Option<PathBuf>,
    /// Serve only the flows of --flows, not the registry's.
    #[arg(long)]
    no_registry: bool,
    /// Time for a worker to acknowledge a command.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// Longest silence of a worker holding a command.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// How long a step may wait for some worker to take it before it fails.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    worker_wait: Duration,
    /// How far apart the hosts' clocks may be.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    clock_skew: Duration,
    /// Where runs are kept: `jetstream` (durable: a restarted coordinator
    /// resumes its runs) or `memory` (lost with the process).
    #[arg(long, default_value = "jetstream", value_parser = ["jetstream", "memory"])]
    store: String,
    /// How long finished runs stay queryable (jetstream store).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Replicas of the KV buckets (3 on a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Dev { .. }) {
        "info"
    } else {
        "warn"
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        // Logs, and spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set;
        // the guard flushes them at exit.
        let _telemetry = orchestrix_coordinator::observability::init("orchestrix", default_level);
        dispatch(cli).await
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let _running = serve(&cli.nats, &args).await?;
            wait_for_signal().await;
            info!("shutting down");
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows(command) => flows_command(&cli.nats, command).await,
        Command::Run { flow, input, version, key, ttl, timeout, detach, json } => {
            let input = Payload::transcode_from(&mut serde_json::Deserializer::from_str(&input))
                .map_err(|e| anyhow!("--input is not valid JSON: {e}"))?;
            let client = client(&cli.nats).await?;
            let options = RunOptions { key, ttl, timeout, traceparent: None, version };
            if detach {
                let run_id = client.start_payload(&flow, input, options).await?;
                if json {
                    println!("{}", serde_json::json!({ "runId": run_id }));
                } else {
                    println!("{run_id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let report = client.run_payload(&flow, input, options).await?;
            print_report(&report, json)?;
            Ok(exit_for(&report))
        }
        Command::Resume { run_id, by } => {
            operate(&cli.nats, run_id, ControlAction::Resume, by).await
        }
        Command::Rollback { run_id, by } => {
            operate(&cli.nats, run_id, ControlAction::Rollback, by).await
        }
        Command::Cancel { run_id, reason, by, wait } => {
            let client = client(&cli.nats).await?;
            let by = by.unwrap_or_else(operator);
            client.cancel(run_id, &by, reason.as_deref()).await?;
            if !wait {
                println!("cancelling run {run_id}");
                return Ok(ExitCode::SUCCESS);
            }
            let report = client.wait(run_id).await?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run_id, json } => {
            let client = client(&cli.nats).await?;
            let report = client.status(run_id).await?;
            print_report(&report, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { run_id, json } => {
            use futures::StreamExt;
            let client = client(&cli.nats).await?;
            let mut events = Box::pin(client.watch(run_id).await?);
            let now = client.status(run_id).await?;
            if !now.status.is_terminal() {
                while let Some(ev) = events.next().await {
                    if json {
                        println!("{}", serde_json::to_string(&ev)?);
                    } else {
                        println!(
                            "{}  {}",
                            ev.at_ms,
                            orchestrix_coordinator::nats::describe(&ev.event)
                        );
                    }
                    if let orchestrix_proto::EventKind::RunEnded { report } = ev.event {
                        if !json {
                            print!("{report}");
                        }
                        return Ok(exit_for(&report));
                    }
                }
            }
            let report = client.status(run_id).await?;
            print_report(&report, json)?;
            Ok(exit_for(&report))
        }
        Command::List { status, flow, limit, json } => {
            let client = client(&cli.nats).await?;
            let runs = client.list(ListFilter::new(status, flow, limit as usize)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                for r in &runs {
                    let failed =
                        r.failed_step.as_deref().map(|s| format!("  at {s}")).unwrap_or_default();
                    println!(
                        "{}  {:<20} {:<20} {:>8} ms{failed}",
                        r.run_id,
                        r.flow,
                        r.status.as_str(),
                        r.duration.as_millis()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { flows, port } => {
            let (server, url) = start_dev_nats(port).await?;
            let mut nats = cli.nats;
            nats.nats = url.clone();
            let args = ServeArgs {
                flows,
                no_registry: false,
                ack_timeout: Duration::from_secs(2),
                heartbeat_timeout: Duration::from_secs(5),
                worker_wait: Duration::from_secs(300),
                clock_skew: Duration::from_millis(500),
                store: "jetstream".into(),
                retention: Duration::from_secs(24 * 3600),
                replicas: 1,
            };
            let _running = serve(&nats, &args).await?;
            println!(
                "NATS (JetStream) is on {url}; a coordinator serves the flows workers register."
            );
            println!("NATS_URL={url}");
            println!("In another terminal:");
            println!("  export NATS_URL={url}");
            println!("  cargo run --example payment_worker");
            println!("and in a third:");
            println!(
                "  cargo run -p orchestrix-coordinator --bin orchestrix -- run payment-flow --input '{{\"orderId\":\"order_1\",\"amount\":50,\"userId\":\"user_A\"}}'"
            );
            println!("Ctrl-C stops both.");
            wait_for_signal().await;
            drop(server);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resume or rollback of a paused run.
async fn operate(
    nats: &NatsArgs,
    run_id: Uuid,
    action: ControlAction,
    by: Option<String>,
) -> anyhow::Result<ExitCode> {
    let client = client(nats).await?;
    client.control(run_id, action, &by.unwrap_or_else(operator), None).await?;
    println!("{} of run {run_id} accepted", action.as_str());
    Ok(ExitCode::SUCCESS)
}

/// Who is acting, for the run's report: `$USER@host`.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    match host.trim() {
        "" => user,
        host => format!("{user}@{host}"),
    }
}

async fn client(nats: &NatsArgs) -> anyhow::Result<Client> {
    let conn = nats.options().connect().await?;
    Ok(Client::new(conn, nats.subjects()?))
}

/// Everything `serve` keeps alive.
struct Running {
    _node: Node,
}

async fn serve(nats: &NatsArgs, args: &ServeArgs) -> anyhow::Result<Running> {
    let flows = match &args.flows {
        Some(path) => flowfile::load(path)?,
        None if args.no_registry => {
            bail!("--no-registry needs --flows: there would be nothing to serve")
        }
        None => Vec::new(),
    };
    let subjects = nats.subjects()?;
    let conn = nats.options().name("orchestrix coordinator").connect().await?;
    let bus_options = NatsBusOptions::default()
        .ack_timeout(args.ack_timeout)
        .heartbeat_timeout(args.heartbeat_timeout)
        .worker_wait(args.worker_wait)
        .clock_skew(args.clock_skew);
    let store = if args.store == "jetstream" {
        NodeStore::JetStream(
            JetStreamStoreOptions::default().replicas(args.replicas).retention(args.retention),
        )
    } else {
        NodeStore::Memory
    };
    let names: Vec<String> = flows.iter().map(|f| f.name.to_string()).collect();
    let node = Node::builder()
        .subjects(subjects.clone())
        .bus_options(bus_options)
        .store(store)
        .flows(flows)
        .registry(!args.no_registry)
        .hooks(orchestrix_coordinator::metrics::RunMetrics::global())
        .start(conn)
        .await?;
    let registered = node.coordinator().flows().len() - names.len();
    info!(nats = %nats.nats, prefix = %subjects.prefix(), store = %args.store, resumed = node.resumed(), flows = ?names, registered, "coordinator ready");
    Ok(Running { _node: node })
}

async fn flows_command(nats: &NatsArgs, command: FlowsCommand) -> anyhow::Result<ExitCode> {
    let subjects = nats.subjects()?;
    let conn = nats.options().connect().await?;
    let replicas = match &command {
        FlowsCommand::Apply { replicas, .. } => *replicas,
        _ => 1,
    };
    let registry = Registry::open(conn, subjects.prefix(), replicas).await?;
    match command {
        FlowsCommand::Apply { file, .. } => {
            let flows = flowfile::load(&file)?;
            let mut refused = 0;
            for def in &flows {
                match registry.register(def, "cli").await {
                    Ok(reg) => println!("{}  version {}", def.name, reg.version),
                    Err(e @ RegistryError::Conflict { .. }) => {
                        eprintln!("error: {e}");
                        refused += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(if refused == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        FlowsCommand::List { json } => {
            let listing = registry_listing(&registry).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else if listing.is_empty() {
                println!("no flows registered");
            } else {
                println!(
                    "{:<24} {:<18} {:>5} {:>7}  REGISTERED",
                    "FLOW", "VERSION", "STEPS", "WORKERS"
                );
                for v in &listing {
                    println!(
                        "{:<24} {:<18} {:>5} {:>7}  {} by {}",
                        v.flow,
                        v.version,
                        v.steps.len(),
                        v.workers.len(),
                        humantime::format_rfc3339_seconds(orchestrix_proto::time::from_unix_ms(
                            v.registered_at_ms
                        )),
                        v.registered_by
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FlowsCommand::Show { name, json } => {
            let listing: Vec<_> =
                registry_listing(&registry).await?.into_iter().filter(|v| v.flow == name).collect();
            if listing.is_empty() {
                bail!("no flow `{name}` is registered (see `orchestrix flows list`)");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
                return Ok(ExitCode::SUCCESS);
            }
            for v in &listing {
                println!("{} version {} (registered by {})", v.flow, v.version, v.registered_by);
                for s in &v.steps {
                    let mut notes = vec![format!("retries {}", s.retry.max_retries)];
                    if let Some(t) = s.timeout {
                        notes.push(format!("timeout {}", humantime::format_duration(t)));
                    }
                    if s.compensable {
                        notes.push("compensable".into());
                    }
                    if s.on_unknown == orchestrix_coordinator::OnUnknown::Retry {
                        notes.push("idempotent".into());
                    }
                    println!("  - {:<24} {}", s.name, notes.join(", "));
                }
                if v.workers.is_empty() {
                    println!("  workers: none live (new runs of this version wait for one)");
                } else {
                    println!("  workers: {}", v.workers.join(", "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One version of a flow as `flows list --json` prints it.
#[derive(serde::Serialize)]
struct VersionListing {
    flow: String,
    version: String,
    registered_at_ms: u64,
    registered_by: String,
    steps: Vec<orchestrix_coordinator::StepDef>,
    workers: Vec<String>,
}

async fn registry_listing(registry: &Registry) -> anyhow::Result<Vec<VersionListing>> {
    let workers = registry.presences().await?;
    let mut out: Vec<VersionListing> = registry
        .registrations()
        .await?
        .into_iter()
        .map(|r| VersionListing {
            workers: workers
                .iter()
                .filter(|p| serves(p, &r.flow.name, &r.version))
                .map(|p| p.worker.clone())
                .collect(),
            flow: r.flow.name.to_string(),
            version: r.version.to_string(),
            registered_at_ms: r.registered_at_ms,
            registered_by: r.registered_by,
            steps: r.flow.steps,
        })
        .collect();
    out.sort_by(|a, b| (&a.flow, a.registered_at_ms).cmp(&(&b.flow, b.registered_at_ms)));
    Ok(out)
}

fn parse_status(s: &str) -> Result<RunStatus, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!(
            "`{s}` is not a status (running, completed, failed, compensation_failed, quarantined)"
        )
    })
}

fn print_report(report: &RunReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn exit_for(report: &RunReport) -> ExitCode {
    match report.status {
        RunStatus::Completed | RunStatus::Running | RunStatus::Paused => ExitCode::SUCCESS,
        RunStatus::Failed
        | RunStatus::CompensationFailed
        | RunStatus::Quarantined
        | RunStatus::Cancelled => ExitCode::from(1),
    }
}

/// A nats-server child process with JetStream in a temp dir; killed on drop.
struct DevNats {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn start_dev_nats(port: Option<u16>) -> anyhow::Result<(DevNats, String)> {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let port = match port {
        Some(p) => p,
        None => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let dir = tempfile::tempdir()?;
    let child = tokio::process::Command::new(&bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| {
            format!("cannot start `{bin}` (install nats-server, or set NATS_SERVER_BIN)")
        })?;
    let url = format!("nats://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((DevNats { _child: child, _dir: dir }, url));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nats-server did not open port {port} within 5 s")
}
