//! Setting up the processes, running the scenarios, reporting.
//!
//! The scenarios run concurrently, in three isolated environments on one
//! `nats-server` (each its own subject prefix, so its own registry, store
//! and queue groups):
//!
//! - `a`: one coordinator and the worker under test: every scenario but 9 and 10;
//! - `b`: the worker under test and coordinators that get SIGKILLed (scenario 9);
//! - `c`: one coordinator, the worker under test and the Rust reference
//!   worker side by side (scenario 10).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix::Client;
use orchestrix_proto::Subjects;
use orchestrix_worker::registry::Registry;
use serde::Serialize;

use crate::KitError;
use crate::flow::FLOW;
use crate::procs::{Child, NatsServer};

/// The scenarios: number, name, what it checks.
pub const SCENARIOS: [(u32, &str, &str); 11] = [
    (1, "success", "all 5 steps completed, 1 attempt each, each started once, acked first"),
    (2, "retries", "flaky fails twice: 3 attempts, starts >= 200 ms apart, run completed"),
    (
        3,
        "permanent-error",
        "decide declines for good: run failed, flaky then record compensated once",
    ),
    (4, "heartbeats", "a 7 s step completes in 1 attempt, acked, then >= 5 heartbeats on the wire"),
    (5, "step-timeout", "bounded is stopped at 1 s (stopped, no end): outcome unknown, rollback"),
    (6, "deadline-refusal", "past its deadline, or its start-by: error `expired`, nothing run"),
    (
        7,
        "malformed-input",
        "garbage, a wrong version, a wrong kind: error `malformed`, still serving",
    ),
    (8, "cancel", "a run cancelled during slow: slow stopped, flaky and record compensated"),
    (
        9,
        "coordinator-kill",
        "its coordinator SIGKILLed during slow: taken over, latest reply subject, nothing ran twice",
    ),
    (
        10,
        "mixed-replicas",
        "next to the Rust worker: one version, 20 runs, both served, no step twice",
    ),
    (11, "no-handler", "a compensate command for decide (no compensation): error `no_handler`"),
];

/// Scenario number of the coordinator kill (environment `b`).
const KILL: u32 = 9;
/// Scenario number of the mixed replicas (environment `c`).
const MIXED: u32 = 10;

/// The longest a scenario may take.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(50);

/// What the kit runs against.
#[derive(Debug, Clone)]
pub struct KitConfig {
    /// Shell command line that starts the worker under test.
    pub worker_command: String,
    /// `$CONFORMANCE_WORKER_NAME` of the worker under test.
    pub worker_name: String,
    /// The `orchestrix` binary (`orchestrix serve`).
    pub orchestrix_bin: PathBuf,
    /// The `nats-server` binary (2.11 or newer).
    pub nats_server_bin: PathBuf,
    /// The Rust reference worker (`conformance-worker`), for scenario 10.
    pub reference_worker: PathBuf,
    /// Scenarios to run, by number or name; empty: all.
    pub only: Vec<String>,
}

/// How one scenario went.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioResult {
    /// Its number (1–11).
    pub number: u32,
    /// Its name.
    pub name: &'static str,
    /// True when every check held.
    pub passed: bool,
    /// How long it took, in ms.
    pub time_ms: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a run of the kit found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KitReport {
    /// `$CONFORMANCE_WORKER_NAME` of the worker under test.
    pub worker: String,
    /// The flow version the worker under test registered.
    pub version: Option<String>,
    /// One per scenario run, by number.
    pub scenarios: Vec<ScenarioResult>,
}

impl KitReport {
    /// True when every scenario passed.
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.passed)
    }

    /// The pass/fail table, as printed.
    pub fn table(&self) -> String {
        let mut out = format!(
            "conformance of worker `{}` (flow {FLOW} version {})\n",
            self.worker,
            self.version.as_deref().unwrap_or("?")
        );
        out.push_str(&format!(
            "{:>3}  {:<18} {:<6} {:>7}  REASON\n",
            "#", "SCENARIO", "RESULT", "TIME"
        ));
        for s in &self.scenarios {
            let result = if s.passed { "pass" } else { "FAIL" };
            let time = format!("{:.2}s", s.time_ms as f64 / 1000.0);
            let reason = s.reason.as_deref().unwrap_or("");
            let line =
                format!("{:>3}  {:<18} {:<6} {:>7}  {reason}", s.number, s.name, result, time);
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let failed = self.scenarios.iter().filter(|s| !s.passed).count();
        out.push_str(&format!("{} passed, {failed} failed\n", self.scenarios.len() - failed));
        out
    }
}

/// The scenario numbers `only` selects (all when empty).
pub fn select(only: &[String]) -> Result<BTreeSet<u32>, KitError> {
    if only.is_empty() {
        return Ok(SCENARIOS.iter().map(|s| s.0).collect());
    }
    let mut picked = BTreeSet::new();
    for item in only.iter().flat_map(|o| o.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let found = SCENARIOS
            .iter()
            .find(|(n, name, _)| item == *name || item.parse::<u32>().is_ok_and(|i| i == *n));
        match found {
            Some((n, ..)) => {
                picked.insert(*n);
            }
            None => {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.1).collect();
                return Err(KitError::Config(format!(
                    "no scenario {item:?} (numbers 1–11 or names: {})",
                    names.join(", ")
                )));
            }
        }
    }
    Ok(picked)
}

/// One isolated environment: a prefix, its coordinators and workers.
#[derive(Debug)]
pub(crate) struct Env {
    /// The subject prefix.
    pub(crate) prefix: String,
    /// Subjects under it.
    pub(crate) subjects: Subjects,
    /// The kit's NATS connection.
    pub(crate) nats: async_nats::Client,
    /// A client of the coordinators.
    pub(crate) client: Client,
    /// Effects files of its workers.
    pub(crate) effects: Vec<PathBuf>,
    /// `CONFORMANCE_WORKER_NAME` of its workers: the one under test first.
    pub(crate) worker_names: Vec<String>,
    /// Coordinators, oldest first.
    pub(crate) coordinators: tokio::sync::Mutex<Vec<Child>>,
    /// Workers: the one under test first.
    workers: tokio::sync::Mutex<Vec<Child>>,
    nats_url: String,
    orchestrix: PathBuf,
}

impl Env {
    async fn new(
        prefix: &str,
        nats: &async_nats::Client,
        nats_url: &str,
        orchestrix: &Path,
    ) -> Result<Env, KitError> {
        let subjects =
            Subjects::new(prefix).map_err(|e| KitError::Config(format!("prefix {prefix}: {e}")))?;
        let client = Client::new(nats.clone(), subjects.clone())
            .request_timeout(Duration::from_secs(5))
            .start_retry_for(Duration::from_secs(15));
        Ok(Env {
            prefix: prefix.to_owned(),
            subjects,
            nats: nats.clone(),
            client,
            effects: Vec::new(),
            worker_names: Vec::new(),
            coordinators: tokio::sync::Mutex::new(Vec::new()),
            workers: tokio::sync::Mutex::new(Vec::new()),
            nats_url: nats_url.to_owned(),
            orchestrix: orchestrix.to_owned(),
        })
    }

    /// Starts a coordinator (`orchestrix serve`, JetStream store) and waits
    /// until it says it is ready.
    pub(crate) async fn start_coordinator(&self) -> Result<(), KitError> {
        let n = self.coordinators.lock().await.len() + 1;
        let args: Vec<String> =
            ["serve", "--nats", &self.nats_url, "--prefix", &self.prefix, "--store", "jetstream"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        let name = format!("coordinator {n} of {}", self.prefix);
        let env = [("RUST_LOG", "info".to_owned()), ("NO_COLOR", "1".to_owned())];
        let mut child = Child::spawn(&name, &self.orchestrix, &args, &env)?;
        child.wait_for_line("coordinator ready", true, Duration::from_secs(30)).await?;
        self.coordinators.lock().await.push(child);
        Ok(())
    }

    /// SIGKILLs the oldest coordinator still running.
    pub(crate) async fn kill_first_coordinator(&self) {
        let mut cs = self.coordinators.lock().await;
        if !cs.is_empty() {
            let mut c = cs.remove(0);
            c.kill().await;
        }
    }

    /// Starts a worker through `sh -c` and waits for its `ready` line.
    async fn start_worker(
        &mut self,
        command: &str,
        name: &str,
        dir: &Path,
    ) -> Result<(), KitError> {
        let effects = dir.join(format!("effects-{}-{name}.jsonl", self.prefix));
        let env = [
            ("NATS_URL", self.nats_url.clone()),
            ("ORCHESTRIX_PREFIX", self.prefix.clone()),
            ("CONFORMANCE_EFFECTS", effects.display().to_string()),
            ("CONFORMANCE_WORKER_NAME", name.to_owned()),
        ];
        let label = format!("worker {name} ({}) of {}", command, self.prefix);
        let mut child = Child::spawn_shell(&label, command, &env)?;
        let ready = async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if child.stdout().iter().any(|l| l.trim_start().starts_with("ready")) {
                    return Ok(());
                }
                if !child.is_running() || tokio::time::Instant::now() >= deadline {
                    return Err(KitError::NotReady {
                        what: label.clone(),
                        detail: format!(
                            "no `ready` line on stdout ({}); stdout: {:?}; stderr (tail): {}",
                            if child.is_running() { "60 s passed" } else { "it exited" },
                            child.stdout(),
                            child.stderr_tail(15)
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        ready.await?;
        self.effects.push(effects);
        self.worker_names.push(name.to_owned());
        self.workers.lock().await.push(child);
        Ok(())
    }

    /// The flow's registered versions, and how many live workers serve it.
    pub(crate) async fn registry(&self) -> Result<(Vec<String>, usize), String> {
        let registry = Registry::open_existing(self.nats.clone(), &self.prefix)
            .await
            .map_err(|e| format!("cannot open the flow registry: {e}"))?;
        let versions: Vec<String> = registry
            .registrations()
            .await
            .map_err(|e| format!("cannot read the flow registry: {e}"))?
            .into_iter()
            .filter(|r| &*r.flow.name == FLOW)
            .map(|r| r.version.to_string())
            .collect();
        let workers = registry
            .presences()
            .await
            .map_err(|e| format!("cannot read the worker presences: {e}"))?
            .into_iter()
            .filter(|p| p.flows.iter().any(|f| &*f.flow == FLOW))
            .count();
        Ok((versions, workers))
    }

    /// Waits until `n` live workers serve the flow.
    async fn wait_for_workers(&self, n: usize) -> Result<Vec<String>, KitError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let seen = self.registry().await;
            match &seen {
                Ok((versions, workers)) if *workers >= n && !versions.is_empty() => {
                    return Ok(versions.clone());
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KitError::NotReady {
                    what: format!("the workers of {}", self.prefix),
                    detail: format!(
                        "{n} live worker(s) of flow `{FLOW}` were expected in the registry within 15 s; saw {seen:?}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The one version of the flow registered here.
    pub(crate) async fn version(&self) -> Result<String, String> {
        let (versions, _) = self.registry().await?;
        match versions.as_slice() {
            [v] => Ok(v.clone()),
            [] => Err(format!("flow `{FLOW}` is not registered")),
            _ => Err(format!("flow `{FLOW}` has several versions: {versions:?}")),
        }
    }

    /// Kills every process of the environment.
    async fn shutdown(&self) {
        for mut w in self.workers.lock().await.drain(..) {
            w.kill().await;
        }
        for mut c in self.coordinators.lock().await.drain(..) {
            c.kill().await;
        }
    }
}

/// The environments a selection needs.
#[derive(Debug, Default)]
pub(crate) struct Envs {
    pub(crate) a: Option<Arc<Env>>,
    pub(crate) b: Option<Arc<Env>>,
    pub(crate) c: Option<Arc<Env>>,
}

async fn setup(
    config: &KitConfig,
    prefix: &str,
    nats: &async_nats::Client,
    url: &str,
    dir: &Path,
    reference: bool,
) -> Result<(Env, String), KitError> {
    let mut env = Env::new(prefix, nats, url, &config.orchestrix_bin).await?;
    let result = async {
        env.start_coordinator().await?;
        env.start_worker(&config.worker_command, &config.worker_name, dir).await?;
        let mut n = 1;
        if reference {
            let name = if config.worker_name == "reference" { "reference-2" } else { "reference" };
            let command = shell_quote(&config.reference_worker.display().to_string());
            env.start_worker(&command, name, dir).await?;
            n = 2;
        }
        let versions = env.wait_for_workers(n).await?;
        Ok::<_, KitError>(versions.join(","))
    }
    .await;
    match result {
        Ok(v) => Ok((env, v)),
        Err(e) => {
            env.shutdown().await;
            Err(e)
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs the selected scenarios against `config`'s worker and returns how
/// each went. Every process it started is gone when it returns.
pub async fn run(config: &KitConfig) -> Result<KitReport, KitError> {
    let selected = select(&config.only)?;
    for (what, path) in [
        ("the orchestrix binary (--orchestrix, ORCHESTRIX_BIN)", &config.orchestrix_bin),
        ("the reference worker (--reference-worker)", &config.reference_worker),
    ] {
        let needed = what.starts_with("the orchestrix") || selected.contains(&MIXED);
        if needed && !path.is_file() {
            return Err(KitError::Config(format!(
                "{what} is not at {}: build it (cargo build -p orchestrix-coordinator --bin orchestrix && cargo build -p orchestrix-conformance --bins)",
                path.display()
            )));
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("orchestrix-conformance-")
        .tempdir()
        .map_err(|e| KitError::Io { what: "creating a temp dir".into(), source: e })?;
    let mut server = NatsServer::start(&config.nats_server_bin).await?;
    let url = server.url();
    let nats = async_nats::connect(&url)
        .await
        .map_err(|e| KitError::Nats(format!("cannot connect to {url}: {e}")))?;
    let needs_a = selected.iter().any(|n| *n != KILL && *n != MIXED);
    let (a, b, c) = tokio::join!(
        async {
            match needs_a {
                true => setup(config, "confa", &nats, &url, dir.path(), false).await.map(Some),
                false => Ok(None),
            }
        },
        async {
            match selected.contains(&KILL) {
                true => setup(config, "confb", &nats, &url, dir.path(), false).await.map(Some),
                false => Ok(None),
            }
        },
        async {
            match selected.contains(&MIXED) {
                true => setup(config, "confc", &nats, &url, dir.path(), true).await.map(Some),
                false => Ok(None),
            }
        },
    );
    // Whatever did come up is shut down if anything failed.
    let envs: Vec<Option<(Env, String)>> = match (a, b, c) {
        (Ok(a), Ok(b), Ok(c)) => vec![a, b, c],
        (a, b, c) => {
            let mut first = None;
            for r in [a, b, c] {
                match r {
                    Ok(Some((env, _))) => env.shutdown().await,
                    Ok(None) => {}
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            server.kill().await;
            return Err(first.unwrap_or_else(|| KitError::Config("setup failed".into())));
        }
    };
    let version = envs.iter().flatten().next().map(|(_, v)| v.clone());
    let mut it = envs.into_iter().map(|e| e.map(|(env, _)| Arc::new(env)));
    let envs =
        Arc::new(Envs { a: it.next().flatten(), b: it.next().flatten(), c: it.next().flatten() });

    let mut tasks = Vec::new();
    for number in selected {
        let envs = envs.clone();
        tasks.push((
            number,
            tokio::spawn(async move {
                let began = Instant::now();
                let outcome =
                    tokio::time::timeout(SCENARIO_TIMEOUT, crate::scenarios::run(number, &envs))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!("did not finish within {SCENARIO_TIMEOUT:?}"))
                        });
                (outcome, began.elapsed())
            }),
        ));
    }
    let mut scenarios = Vec::new();
    for (number, task) in tasks {
        let (outcome, took) = match task.await {
            Ok(done) => done,
            Err(e) => (Err(format!("the scenario panicked: {e}")), Duration::ZERO),
        };
        let name = SCENARIOS.iter().find(|s| s.0 == number).map_or("?", |s| s.1);
        scenarios.push(ScenarioResult {
            number,
            name,
            passed: outcome.is_ok(),
            time_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            reason: outcome.err(),
        });
    }
    for env in [&envs.a, &envs.b, &envs.c].into_iter().flatten() {
        env.shutdown().await;
    }
    server.kill().await;
    Ok(KitReport { worker: config.worker_name.clone(), version, scenarios })
}
