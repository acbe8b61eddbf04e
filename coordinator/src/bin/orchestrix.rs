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
use orchestrix_proto::{ControlAction, Payload, RunId, Subjects};
use orchestrix_worker::registry::{Registry, RegistryError};
use orchestrix_worker::{NatsOptions, wait_for_signal};
use tracing::info;

/// `println!` that ends the program quietly when stdout is closed (`| head`),
/// as other command-line tools do, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => { emit(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!`, the same way.
macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}

fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "orchestrix",
    version,
    about = "Distributed sagas over NATS: the coordinator and its CLI",
    after_help = "Exit codes: 0 success (for run, status, watch: the run completed, or has not ended yet); 1 the run ended failed, compensation_failed, cancelled or quarantined; 2 usage, configuration or connection errors, or a refused request."
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
    /// Root certificate to trust (PEM), the CA that signed the server's; implies TLS.
    #[arg(long, global = true, env = "NATS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with --tls-key.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Prefix of this connection's reply subjects (`_INBOX_{user}` with the
    /// permissions `orchestrix auth config` writes).
    #[arg(long, global = true, env = "NATS_INBOX_PREFIX")]
    inbox_prefix: Option<String>,
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
        if let Some(p) = &self.inbox_prefix {
            o = o.inbox_prefix(p.clone());
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
    /// Least privilege: NATS permissions per role.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Start a run and print its report.
    Run {
        /// Flow name.
        flow: String,
        /// The run's input, as JSON: inline, `@FILE` to read a file, or `-` to read stdin.
        #[arg(long, default_value = "null")]
        input: String,
        /// Run this version of the flow (default: the newest one a live worker serves).
        #[arg(long = "flow-version")]
        version: Option<String>,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        /// How long the key outlives its run (e.g. 1h, 30m).
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Deadline of the whole run (e.g. 30s).
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
        /// Concurrency key (e.g. account:42): runs of the flow with the same
        /// key take turns, up to the flow's limit per key at once.
        #[arg(long)]
        concurrency_key: Option<String>,
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
        run_id: RunId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: stop its step in flight, compensate what completed, end it `cancelled`.
    Cancel {
        /// The run's id.
        run_id: RunId,
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
        run_id: RunId,
        /// Who (recorded in the run's report; default: `$USER@host`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Roll a paused run back: its paused step fails for good and the rollback goes on.
    Rollback {
        /// The run's id.
        run_id: RunId,
        /// Who (recorded in the run's report; default: `$USER@host`).
        #[arg(long)]
        by: Option<String>,
    },
    /// Follow a run's events live, then print its report.
    Watch {
        /// The run's id.
        run_id: RunId,
        /// Print events and the report as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List recent runs, newest first.
    List {
        /// Only runs in this status (running, paused, completed, failed, compensation_failed, cancelled, quarantined).
        #[arg(long, value_parser = parse_status)]
        status: Option<RunStatus>,
        /// Only runs of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The run browser: every run, its steps, attempts and rollback, live, in a web page
    /// (and a JSON API) at http://127.0.0.1:8233.
    Ui(UiArgs),
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
enum AuthCommand {
    /// Print a nats-server `authorization` block with one user per role:
    /// each may publish and subscribe to what its role needs, nothing more.
    Config {
        /// A user: `NAME:ROLE` or `NAME:ROLE:FLOW[,FLOW…]` (roles: coordinator,
        /// worker, client, viewer, operator; flows for workers and clients).
        /// Its password is read from `$NAME_PASSWORD` by nats-server.
        #[arg(long = "grant", required = true, value_parser = parse_user)]
        users: Vec<orchestrix_coordinator::auth::User>,
    },
    /// Write a development CA and a server certificate signed by it (PEM):
    /// `ca.pem`, `server.pem`, `server-key.pem` in DIR. For trying TLS, not
    /// for production (use your own PKI there).
    Certs {
        /// Where to write them (created when missing).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names and addresses the server certificate is valid for.
        #[arg(long = "host", default_values_t = ["127.0.0.1".to_string(), "localhost".to_string()])]
        hosts: Vec<String>,
    },
}

fn parse_user(s: &str) -> Result<orchestrix_coordinator::auth::User, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(name), Some(role)) = (parts.next(), parts.next()) else {
        return Err(format!("`{s}` is not NAME:ROLE[:FLOW,…]"));
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("user name `{name}`: letters, digits, `-`, `_` only"));
    }
    let role: orchestrix_coordinator::auth::Role = role.parse()?;
    let flows: Vec<String> = parts
        .next()
        .map(|f| f.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    for f in &flows {
        orchestrix_proto::validate_name("flow", f).map_err(|e| e.to_string())?;
    }
    use orchestrix_coordinator::auth::Role::{Client as C, Worker as W};
    if matches!(role, W | C) && flows.is_empty() {
        return Err(format!("`{s}`: a worker or client needs its flows (NAME:ROLE:FLOW,…)"));
    }
    if !matches!(role, W | C) && !flows.is_empty() {
        return Err(format!(
            "`{s}`: only workers and clients are limited to flows; drop `:{}`",
            flows.join(",")
        ));
    }
    Ok(orchestrix_coordinator::auth::User::new(name, role, flows))
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

#[derive(Args, Debug, Clone)]
struct UiArgs {
    /// Where to listen. Beyond loopback, a token is required.
    #[arg(long, default_value = "127.0.0.1:8233", env = "ORCHESTRIX_UI_LISTEN")]
    listen: std::net::SocketAddr,
    /// The bearer token every request must carry.
    #[arg(long, env = "ORCHESTRIX_UI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve operator actions (cancel, resume, rollback) from the page and the API.
    #[arg(long)]
    allow_actions: bool,
    /// A link to each run's trace; `{run_id}` is replaced. For Jaeger:
    /// 'http://localhost:16686/search?service=orchestrix&tags=%7B%22orchestrix.run_id%22%3A%22{run_id}%22%7D'
    #[arg(long, env = "ORCHESTRIX_UI_TRACE_URL")]
    trace_url: Option<String>,
}

impl UiArgs {
    fn options(&self) -> orchestrix_coordinator::ui::UiOptions {
        let mut o = orchestrix_coordinator::ui::UiOptions::default()
            .listen(self.listen)
            .allow_actions(self.allow_actions);
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(t) = &self.trace_url {
            o = o.trace_url(t.clone());
        }
        o
    }
}

/// Starts the run browser on `conn` (the registry read if there is one).
async fn start_ui(
    conn: async_nats::Client,
    subjects: &Subjects,
    args: &UiArgs,
) -> anyhow::Result<orchestrix_coordinator::ui::UiServer> {
    let registry = Registry::open_existing(conn.clone(), subjects.prefix()).await.ok();
    let client = Client::new(conn, subjects.clone());
    let server = orchestrix_coordinator::ui::serve(client, registry, args.options()).await?;
    info!(url = %format!("http://{}", server.addr()), actions = args.allow_actions, "run browser ready");
    Ok(server)
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Also serve the run browser here (as `orchestrix ui --listen`).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// With --http: the bearer token the browser requires.
    #[arg(long, env = "ORCHESTRIX_UI_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// With --http: serve operator actions from the browser.
    #[arg(long)]
    http_allow_actions: bool,
    /// A flow file (TOML) with flows to serve besides those workers register.
    #[arg(long, env = "ORCHESTRIX_FLOWS")]
    flows: Option<PathBuf>,
    /// Serve only the flows of --flows, not the registry's.
    #[arg(long)]
    no_registry: bool,
    /// Time for a worker to acknowledge a command.
    #[arg(long, default_value = "2s", value_parser = duration)]
    ack_timeout: Duration,
    /// Longest silence of a worker holding a command.
    #[arg(long, default_value = "5s", value_parser = duration)]
    heartbeat_timeout: Duration,
    /// How long a step may wait for some worker to take it before it fails.
    #[arg(long, default_value = "5m", value_parser = duration)]
    worker_wait: Duration,
    /// How far apart the hosts' clocks may be.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    clock_skew: Duration,
    /// Where runs are kept: `jetstream` (durable: a restarted coordinator
    /// resumes its runs) or `memory` (lost with the process).
    #[arg(long, default_value = "jetstream", value_parser = ["jetstream", "memory"])]
    store: String,
    /// How long finished runs stay queryable (jetstream store).
    #[arg(long, default_value = "24h", value_parser = duration)]
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
        let _telemetry = orchestrix_worker::telemetry::init("orchestrix", default_level);
        dispatch(cli).await
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", orchestrix_worker::said_once(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ui(args) => {
            let subjects = cli.nats.subjects()?;
            let conn = cli.nats.options().name("orchestrix ui").connect().await?;
            let server = start_ui(conn, &subjects, &args).await?;
            outln!("run browser on http://{}", server.addr());
            wait_for_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let _running = serve(&cli.nats, &args).await?;
            wait_for_signal().await;
            info!("shutting down");
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows(command) => flows_command(&cli.nats, command).await,
        Command::Auth(AuthCommand::Config { users }) => {
            let prefix = cli.nats.subjects()?;
            if let Err(e) = orchestrix_coordinator::auth::check_users(&users) {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
            out!("{}", orchestrix_coordinator::auth::server_config(prefix.prefix(), &users));
            eprintln!(
                "# each component connects with its user and NATS_INBOX_PREFIX=_INBOX_<user>"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth(AuthCommand::Certs { out, hosts }) => {
            let written = orchestrix_coordinator::auth::dev_certificates(&out, &hosts)?;
            for path in written {
                println!("{}", path.display());
            }
            eprintln!(
                "# point nats-server's tls {{ cert_file, key_file }} at server.pem and server-key.pem; clients trust ca.pem (NATS_CA)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { flow, input, version, key, ttl, timeout, concurrency_key, detach, json } => {
            let input = read_input(&input)?;
            let client = client(&cli.nats).await?;
            let mut options = RunOptions::with(key, ttl, timeout, version);
            options.concurrency_key = concurrency_key;
            let started = client.submit(&flow, input, options).await?;
            let run_id = started.run_id;
            if started.duplicate {
                eprintln!(
                    "note: the idempotency key names run {run_id}, started earlier: nothing new runs; this is that run"
                );
            }
            if detach {
                if json {
                    outln!(
                        "{}",
                        serde_json::json!({ "runId": run_id, "duplicate": started.duplicate })
                    );
                } else {
                    outln!("{run_id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            // Said at once: a run waiting for a worker can take a while.
            if !started.duplicate {
                eprintln!(
                    "run {run_id} started; waiting for its report (ctrl-c stops waiting, not the run)"
                );
            }
            let report = wait_telling_pauses(&client, run_id).await?;
            print_report(&report, json, false)?;
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
                outln!("cancelling run {run_id}");
                return Ok(ExitCode::SUCCESS);
            }
            let report = client.wait(run_id).await?;
            out!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run_id, json } => {
            let client = client(&cli.nats).await?;
            let report = status_of(&client, run_id).await?;
            print_report(&report, json, false)?;
            Ok(exit_for(&report))
        }
        Command::Watch { run_id, json } => {
            use futures::StreamExt;
            let client = client(&cli.nats).await?;
            let mut events = Box::pin(client.watch(run_id).await?);
            let now = status_of(&client, run_id).await?;
            if !now.status.is_terminal() {
                // What happened before this watch began, from the run's report.
                if json {
                    outln!("{}", serde_json::json!({ "snapshot": &now }));
                } else {
                    outln!("so far:");
                    out!("{now}");
                }
                while let Some(ev) = events.next().await {
                    if json {
                        // One case in all JSON output: the report's camelCase.
                        outln!("{}", orchestrix_coordinator::nats::event_json(&ev));
                    } else {
                        let at = humantime::format_rfc3339_millis(
                            orchestrix_proto::time::from_unix_ms(ev.at_ms),
                        );
                        outln!("{at}  {}", orchestrix_coordinator::nats::describe(&ev.event));
                    }
                    if let orchestrix_proto::EventKind::RunEnded { report } = ev.event {
                        if !json {
                            out!("{report}");
                        }
                        return Ok(exit_for(&report));
                    }
                }
            }
            let report = client.status(run_id).await?;
            print_report(&report, json, true)?;
            Ok(exit_for(&report))
        }
        Command::List { status, flow, limit, json } => {
            let client = client(&cli.nats).await?;
            let runs = client.list(ListFilter::new(status, flow, limit as usize)).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                for r in &runs {
                    let failed =
                        r.failed_step.as_deref().map(|s| format!("  at {s}")).unwrap_or_default();
                    outln!(
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
                http: None,
                http_token: None,
                http_allow_actions: false,
            };
            let running = serve(&nats, &args).await?;
            // The run browser, with actions (a local sandbox): on its usual
            // port when free, else on any.
            let conn = nats.options().name("orchestrix ui").connect().await?;
            let subjects = nats.subjects()?;
            let mut ui_args = UiArgs {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8233)),
                token: None,
                allow_actions: true,
                trace_url: None,
            };
            let ui = match start_ui(conn.clone(), &subjects, &ui_args).await {
                Ok(ui) => ui,
                Err(_) => {
                    ui_args.listen.set_port(0);
                    start_ui(conn, &subjects, &ui_args).await?
                }
            };
            outln!(
                "NATS (JetStream) is on {url}; a coordinator serves the flows workers register."
            );
            outln!("NATS_URL={url}");
            outln!("In another terminal:");
            outln!("  export NATS_URL={url}");
            outln!("  cargo run --example payment_worker");
            outln!("and in a third:");
            outln!("  export NATS_URL={url}");
            outln!(
                "  cargo run -p orchestrix-coordinator --bin orchestrix -- run payment-flow --input '{{\"orderId\":\"order_1\",\"amount\":50,\"userId\":\"user_A\"}}'"
            );
            outln!("Runs, live, in a browser: http://{}", ui.addr());
            outln!("Ctrl-C stops both.");
            wait_for_signal().await;
            info!("shutting down");
            // The coordinator first, while it can still reach NATS.
            drop(ui);
            drop(running);
            server.stop();
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `--input` JSON as the run's payload: inline, `@file`, or `-` (stdin).
fn read_input(arg: &str) -> anyhow::Result<Payload> {
    let (text, from) = match arg {
        "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read --input from stdin")?;
            (text, "stdin".to_owned())
        }
        _ => match arg.strip_prefix('@') {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read --input file {path}: {e}"))?,
                path.to_owned(),
            ),
            None => (arg.to_owned(), "--input".to_owned()),
        },
    };
    Payload::transcode_from(&mut serde_json::Deserializer::from_str(&text)).map_err(|e| {
        anyhow!(
            "{from} is not valid JSON: {}",
            e.to_string().trim_start_matches("cannot encode payload: ")
        )
    })
}

/// A run's report, asked again for `TAKEOVER_GRACE` while no coordinator
/// knows the run (its coordinator may have died before its first
/// checkpoint, and another be taking it over), saying so on stderr.
async fn status_of(
    client: &Client,
    run_id: RunId,
) -> Result<RunReport, orchestrix_coordinator::nats::ClientError> {
    use orchestrix_client::TAKEOVER_GRACE;
    let give_up = std::time::Instant::now() + TAKEOVER_GRACE;
    let mut said = false;
    loop {
        match client.status(run_id).await {
            Err(e)
                if e.rejection() == Some(orchestrix_coordinator::nats::Rejection::UnknownRun)
                    && std::time::Instant::now() < give_up =>
            {
                if !said {
                    eprintln!(
                        "no coordinator knows run {run_id} yet: asking again for {} s, in case one is taking it over",
                        TAKEOVER_GRACE.as_secs()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Waits for a run's report, saying on stderr when it pauses (it then
/// waits for an operator: this command keeps waiting).
async fn wait_telling_pauses(client: &Client, run_id: RunId) -> anyhow::Result<RunReport> {
    use futures::StreamExt;
    let events = client.watch(run_id).await.ok();
    let wait = client.wait(run_id);
    tokio::pin!(wait);
    let Some(events) = events else { return Ok(wait.await?) };
    let mut events = Box::pin(events);
    loop {
        tokio::select! {
            report = &mut wait => return Ok(report?),
            Some(ev) = events.next() => {
                if let orchestrix_proto::EventKind::RunPaused { step, error, .. } = &ev.event {
                    eprintln!(
                        "run {run_id} paused at {step}: {error}\n  waiting for an operator: `orchestrix resume {run_id}` or `orchestrix rollback {run_id}` (ctrl-c stops waiting)"
                    );
                }
            }
        }
    }
}

/// Resume or rollback of a paused run.
async fn operate(
    nats: &NatsArgs,
    run_id: RunId,
    action: ControlAction,
    by: Option<String>,
) -> anyhow::Result<ExitCode> {
    let client = client(nats).await?;
    client.control(run_id, action, &by.unwrap_or_else(operator), None).await?;
    outln!("{} of run {run_id} accepted", action.as_str());
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

/// A duration flag: `500ms`, `30s`, `5m`, `24h`, `1h 30m`.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 500ms, 30s, 5m or 24h"))
}

async fn client(nats: &NatsArgs) -> anyhow::Result<Client> {
    let conn = nats.options().connect().await?;
    Ok(Client::new(conn, nats.subjects()?))
}

/// Everything `serve` keeps alive.
struct Running {
    _node: NodeThread,
    _ui: Option<orchestrix_coordinator::ui::UiServer>,
}

/// The node on an actix system of its own: one thread for its NATS
/// connection, its tasks and every run's actor, so that a reply reaches its
/// run and a command leaves without a hand-off between threads (a third
/// less CPU a run than the node's tasks on the runtime and its runs on one
/// arbiter per core: docs/benchmarks.md). More cores are used by more
/// coordinators, which share the runs.
struct NodeThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeThread {
    /// Connects and starts the node on its thread; returns it with its
    /// connection, the number of runs it resumed and of flows it serves.
    async fn start(
        builder: orchestrix_coordinator::nats::NodeBuilder,
        connect: NatsOptions,
    ) -> anyhow::Result<(NodeThread, async_nats::Client, usize, usize)> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread =
            std::thread::Builder::new().name("orchestrix-node".into()).spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let started = async {
                        let conn = connect.connect().await?;
                        let node = builder.start(conn.clone()).await?;
                        anyhow::Ok((node, conn))
                    };
                    match started.await {
                        Ok((node, conn)) => {
                            let serving = node.coordinator().flows().len();
                            let _ = ready_tx.send(Ok((conn, node.resumed(), serving)));
                            let _ = stopped.await;
                            drop(node);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let mut node = NodeThread { stop: Some(stop), thread: Some(thread) };
        match ready_rx.await {
            Ok(Ok((conn, resumed, serving))) => Ok((node, conn, resumed, serving)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                node.stop.take();
                Err(anyhow::anyhow!("the coordinator's thread ended before it was ready"))
            }
        }
    }
}

impl Drop for NodeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
    let ui_args = args.http.map(|listen| UiArgs {
        listen,
        token: args.http_token.clone(),
        allow_actions: args.http_allow_actions,
        trace_url: None,
    });
    if let Some(ui) = &ui_args {
        // Refused before the coordinator starts (and takes runs over): bad
        // options, or an address taken (tried, then let go for the page).
        ui.options().check()?;
        std::net::TcpListener::bind(ui.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", ui.listen))?;
    }
    let names: Vec<String> = flows.iter().map(|f| f.name.to_string()).collect();
    let builder = Node::builder()
        .subjects(subjects.clone())
        .bus_options(bus_options)
        .store(store)
        .flows(flows)
        .registry(!args.no_registry)
        .hooks(orchestrix_coordinator::metrics::RunMetrics::global());
    let connect = nats.options().name("orchestrix coordinator");
    let (node, node_conn, resumed, serving) = NodeThread::start(builder, connect).await?;
    let registered = serving - names.len();
    info!(nats = %orchestrix_worker::redact_url(&nats.nats), prefix = %subjects.prefix(), store = %args.store, resumed, flows = ?names, registered, "coordinator ready");
    let ui = match &ui_args {
        Some(ui_args) => Some(start_ui(node_conn, &subjects, ui_args).await?),
        None => None,
    };
    Ok(Running { _node: node, _ui: ui })
}

async fn flows_command(nats: &NatsArgs, command: FlowsCommand) -> anyhow::Result<ExitCode> {
    let subjects = nats.subjects()?;
    let conn = nats.options().connect().await?;
    let result = flows_on(conn.clone(), &subjects, command).await;
    // A refused operation surfaces as a timeout or a missing bucket: say
    // what the server refused instead.
    match (result, orchestrix_worker::permission_violations(&conn).pop()) {
        (Err(e), Some(refused)) => Err(anyhow::anyhow!(
            "{e}; NATS refused this user: {refused} (its role lacks this: see `orchestrix auth config` and docs/security.md)"
        )),
        (result, _) => result,
    }
}

async fn flows_on(
    conn: async_nats::Client,
    subjects: &Subjects,
    command: FlowsCommand,
) -> anyhow::Result<ExitCode> {
    let registry = match &command {
        FlowsCommand::Apply { replicas, .. } => {
            Registry::open(conn, subjects.prefix(), *replicas).await?
        }
        // Reading creates nothing: a wrong --prefix says so.
        _ => Registry::open_existing(conn, subjects.prefix()).await?,
    };
    match command {
        FlowsCommand::Apply { file, .. } => {
            let flows = flowfile::load(&file)?;
            // All or nothing: every conflict is found before anything is written.
            let mut conflicts = Vec::new();
            for def in &flows {
                if let Err(e) = registry.check(def).await {
                    match e {
                        RegistryError::Conflict { .. } => conflicts.push(e.to_string()),
                        e => return Err(e.into()),
                    }
                }
            }
            if !conflicts.is_empty() {
                for c in &conflicts {
                    eprintln!("error: {c}");
                }
                bail!(
                    "nothing applied: {} conflicting flow(s) in {}",
                    conflicts.len(),
                    file.display()
                );
            }
            let by = format!("cli:{}", operator());
            for def in &flows {
                let reg = registry.register(def, &by).await?;
                outln!("{}  version {}", def.name, reg.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        FlowsCommand::List { json } => {
            let listing = orchestrix_coordinator::listing::flow_versions(&registry).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&orchestrix_coordinator::nats::camel_case(
                        serde_json::to_value(&listing)?
                    ))?
                );
            } else if listing.is_empty() {
                outln!("no flows registered under prefix `{}`", subjects.prefix());
            } else {
                outln!(
                    "  {:<24} {:<18} {:>5} {:>7}  {:<8} REGISTERED",
                    "FLOW",
                    "VERSION",
                    "STEPS",
                    "WORKERS",
                    "SERVED"
                );
                for v in &listing {
                    let served = if v.unserved.is_empty() {
                        "yes"
                    } else if v.workers.is_empty() {
                        "no"
                    } else {
                        "partly"
                    };
                    outln!(
                        "{} {:<24} {:<18} {:>5} {:>7}  {:<8} {} by {}",
                        if v.new_runs { "*" } else { " " },
                        v.flow,
                        v.version,
                        v.steps.len(),
                        v.workers.len(),
                        served,
                        humantime::format_rfc3339_seconds(orchestrix_proto::time::from_unix_ms(
                            v.registered_at_ms
                        )),
                        v.registered_by
                    );
                }
                outln!("(* the version new runs take)");
            }
            Ok(ExitCode::SUCCESS)
        }
        FlowsCommand::Show { name, json } => {
            let listing: Vec<_> = orchestrix_coordinator::listing::flow_versions(&registry)
                .await?
                .into_iter()
                .filter(|v| v.flow == name)
                .collect();
            if listing.is_empty() {
                bail!("no flow `{name}` is registered (see `orchestrix flows list`)");
            }
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&orchestrix_coordinator::nats::camel_case(
                        serde_json::to_value(&listing)?
                    ))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            for v in &listing {
                let default = if v.new_runs { ", new runs take this version" } else { "" };
                outln!(
                    "{} version {} (registered by {}{default})",
                    v.flow,
                    v.version,
                    v.registered_by
                );
                if let Some(n) = v.concurrency_per_key {
                    outln!("  runs per concurrency key at once: {n}");
                }
                if v.input_schema.is_some() {
                    outln!("  inputs checked against the flow's input schema (--json shows it)");
                }
                for s in &v.steps {
                    let mut notes = vec![format!("retries {}", s.retry.retries)];
                    if s.retry.retries > 0 {
                        notes.push(format!(
                            "delay {}",
                            humantime::format_duration(s.retry.retry_delay)
                        ));
                        if s.retry.backoff > 1.0 {
                            notes.push(format!("backoff {}", s.retry.backoff));
                        }
                    }
                    if let Some(t) = s.timeout {
                        notes.push(format!("timeout {}", humantime::format_duration(t)));
                    }
                    if s.compensable {
                        notes.push("compensable".into());
                    }
                    if s.on_unknown == orchestrix_coordinator::OnUnknown::Retry {
                        notes.push("idempotent".into());
                    }
                    if s.on_exhausted == orchestrix_coordinator::OnExhausted::Pause {
                        notes.push("pauses when exhausted".into());
                    }
                    if let Some(g) = &s.group {
                        notes.push(format!("parallel group {g}"));
                    }
                    if let Some(n) = s.max_in_flight {
                        notes.push(format!("at most {n} in flight"));
                    }
                    let gap = if v.unserved.iter().any(|u| *u == *s.name) {
                        "   <- no live worker serves this step"
                    } else {
                        ""
                    };
                    outln!("  - {:<24} {}{gap}", s.name, notes.join(", "));
                }
                match (v.workers.is_empty(), v.unserved.is_empty()) {
                    (true, _) => {
                        outln!("  workers: none live (runs pinned to this version wait for one)")
                    }
                    (false, true) => outln!("  workers: {}", v.workers.join(", ")),
                    (false, false) => outln!(
                        "  workers: {} (not every step is served: new runs do not take this version)",
                        v.workers.join(", ")
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_status(s: &str) -> Result<RunStatus, String> {
    s.parse()
}

/// The report as text, or as JSON: pretty, or on one line where the output
/// is JSON lines (`watch --json`).
fn print_report(report: &RunReport, json: bool, one_line: bool) -> anyhow::Result<()> {
    match (json, one_line) {
        (true, true) => outln!("{}", serde_json::to_string(report)?),
        (true, false) => outln!("{}", serde_json::to_string_pretty(report)?),
        (false, _) => out!("{report}"),
    }
    Ok(())
}

fn exit_for(report: &RunReport) -> ExitCode {
    match report.status {
        RunStatus::Completed | RunStatus::Queued | RunStatus::Running | RunStatus::Paused => {
            ExitCode::SUCCESS
        }
        RunStatus::Failed
        | RunStatus::CompensationFailed
        | RunStatus::Quarantined
        | RunStatus::Cancelled => ExitCode::from(1),
    }
}

/// A nats-server child process with JetStream in a temp dir. Killed, and the
/// dir removed, when dropped or stopped; killed by the kernel if this process
/// dies without either (see [`die_with_parent`]).
struct DevNats {
    child: tokio::process::Child,
    dir: Option<tempfile::TempDir>,
}

impl DevNats {
    /// Kills the server and waits until it is gone, so that nothing writes
    /// to its directory any more.
    fn kill(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = self.child.start_kill();
        // A killed process is reaped within milliseconds; this bound only
        // guards against waiting forever on a process stuck in the kernel.
        for _ in 0..200 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server and removes its directory, saying so if it cannot.
    fn stop(mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().display().to_string();
            if let Err(e) = dir.close() {
                eprintln!("warning: cannot remove nats-server's directory {path}: {e}");
            }
        }
    }
}

impl Drop for DevNats {
    fn drop(&mut self) {
        // Before the directory (a field) is removed.
        self.kill();
    }
}

/// Has the kernel SIGKILL the child when this process dies, however it dies:
/// `kill -9` included, which runs no destructor.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child ends,
/// not the process: `dev` spawns it from the main thread (the runtime's
/// `block_on`), which lives as long as the process.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two system calls,
    // `prctl` and `getppid` (both async-signal-safe), reads errno, and builds
    // `io::Error`s from an OS code, which does not allocate. It touches no
    // lock, allocator or state shared with the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: no signal would come.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Elsewhere the server outlives a `dev` that is killed outright.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut tokio::process::Command) {}

async fn start_dev_nats(port: Option<u16>) -> anyhow::Result<(DevNats, String)> {
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let port = match port {
        // Someone else's server there would be joined silently: refuse.
        Some(p) => match TcpListener::bind(("127.0.0.1", p)) {
            Ok(l) => l.local_addr()?.port(),
            Err(e) => bail!(
                "port {p} on 127.0.0.1 is not free ({e}): is a NATS server already running there? Use it with `orchestrix serve --nats nats://127.0.0.1:{p}`, or pick another --port"
            ),
        },
        None => TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("nats-server.log");
    let mut command = tokio::process::Command::new(&bin);
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .arg("-l")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    die_with_parent(&mut command);
    let child = command.spawn().with_context(|| {
        format!("cannot start `{bin}` (install nats-server, or set NATS_SERVER_BIN)")
    })?;
    let mut server = DevNats { child, dir: Some(dir) };
    let url = format!("nats://127.0.0.1:{port}");
    for _ in 0..100 {
        if let Ok(Some(status)) = server.child.try_wait() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            let said = match said.trim_end() {
                "" => "(it printed nothing)".to_owned(),
                s => s.to_owned(),
            };
            bail!("nats-server exited ({status}) before it was ready:\n{said}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((server, url));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nats-server did not open port {port} within 5 s")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
