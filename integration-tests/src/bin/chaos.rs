//! `chaos`: the fault-injection harness.
//!
//! Starts a 3-node JetStream cluster of real `nats-server` processes (loopback
//! only), 3 coordinators (the `orchestrix` binary, `serve --store jetstream
//! --replicas 3`) and 3 `ledger_worker` processes, then starts many runs of the
//! 3-step flow `chaos` (`reserve`, `charge`, `notify`, all compensable; a
//! quarter of the runs fail at `notify` for good) while it kills and freezes
//! processes on a seeded schedule:
//!
//! - SIGKILL a coordinator, restart it;
//! - SIGKILL a worker, restart it;
//! - SIGKILL the NATS node leading the `KV_orchestrix_runs` stream, restart it 6–8 s later;
//! - SIGSTOP a worker for 3–5 s, then SIGCONT.
//!
//! Once the faults are over it waits (bounded) for every run to end, reads the
//! workers' ledgers (one line per handler start, see `ledger_worker`) and
//! reports lost and stuck runs, executions per step, duplicate executions of one
//! command, compensations, unknown outcomes, and maybe-done steps of failed runs
//! left without a compensation.
//!
//! ```sh
//! cargo build --release -j2 -p orchestrix-coordinator -p orchestrix-integration-tests --bins \
//!   && target/release/chaos --runs 1000          # or: --short (200 runs, 5 faults)
//! ```
//!
//! `nats-server` is `$NATS_SERVER_BIN`, else the one on the PATH. Exit codes:
//! 0 no finding, 1 findings (see the verdict), 2 the harness could not run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use futures::StreamExt as _;
use orchestrix::{NatsOptions, RunOptions, RunReport};
use orchestrix_coordinator::nats::{Client, Rejection};
use orchestrix_integration_tests::NatsCluster;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const FLOW: &str = "chaos";
const STEPS: [&str; 3] = ["reserve", "charge", "notify"];
/// The KV bucket of live runs, as a stream (default prefix).
const RUNS_STREAM: &str = "KV_orchestrix_runs";
const COORDINATORS: usize = 3;
const WORKERS: usize = 3;
/// How long a start is retried with its key.
const START_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long a run holds its slot of concurrency while the faults go on.
const FOLLOW_FOR: Duration = Duration::from_secs(20);
/// A run answering "unknown run" this long, once everything is back, is lost.
const UNKNOWN_FOR: Duration = Duration::from_secs(15);

const FLOW_FILE: &str = r#"# Written by the chaos harness.
[[flow]]
name = "chaos"
"#;

fn step_toml(name: &str) -> String {
    format!(
        "\n[[flow.step]]\nname = \"{name}\"\ncompensable = true\nretries = 6\nretry_delay_ms = 200\n\
         backoff = 2.0\nmax_delay_ms = 3000\ntimeout_ms = 5000\ncompensation_retries = 8\n\
         compensation_retry_delay_ms = 200\ncompensation_backoff = 2.0\ncompensation_timeout_ms = 5000\n"
    )
}

#[derive(Parser, Debug)]
#[command(
    name = "chaos",
    about = "Fault-injection harness: runs under killed and frozen processes"
)]
struct Args {
    /// Runs to start [default: 1000; 200 with --short].
    #[arg(long)]
    runs: Option<usize>,
    /// The short version: 200 runs, one fault of each kind.
    #[arg(long)]
    short: bool,
    /// Seed of the inputs and of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rounds of faults, each one of every kind in a seeded order [default: 3; 1 with --short].
    #[arg(long)]
    rounds: Option<usize>,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 48)]
    concurrency: usize,
    /// Longest wait, once the faults are over, for every run to end, in seconds [default: 120; 60 with --short].
    #[arg(long)]
    settle_secs: Option<u64>,
    /// Print the report as JSON (instead of the table).
    #[arg(long)]
    json: bool,
    /// Keep logs and ledgers here [default: a temp dir, kept only when there are findings].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The `orchestrix` binary [default: next to this one].
    #[arg(long)]
    orchestrix: Option<PathBuf>,
    /// The `ledger_worker` binary [default: next to this one].
    #[arg(long)]
    worker: Option<PathBuf>,
}

/// The `chaos` flow's input (as `ledger_worker` reads it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChaosInput {
    id: u64,
    fail: bool,
    delay_ms: u64,
}

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------- utilities

/// SplitMix64: a small seeded generator, so that a seed means one schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Progress lines on stderr, stamped with the time since the start.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    fn say(&self, what: impl std::fmt::Display) {
        eprintln!("[{:7.1}s] {what}", self.secs());
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn signal(pid: u32, sig: &str) -> Res<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map_err(|e| format!("kill(1): {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("kill -{sig} {pid} failed")) }
}

// ---------------------------------------------------------------- processes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Coordinator,
    Worker,
}

/// One coordinator or worker, across its incarnations (`c1.0`, `c1.1`, ...).
struct Slot {
    role: Role,
    index: usize,
    generation: u32,
    started: bool,
    /// The current incarnation printed its readiness line.
    ready: bool,
    child: Option<Child>,
    /// Whether the harness wants it running (false while a fault holds it down).
    wanted: bool,
}

impl Slot {
    fn incarnation(&self) -> String {
        let r = match self.role {
            Role::Coordinator => 'c',
            Role::Worker => 'w',
        };
        format!("{r}{}.{}", self.index, self.generation)
    }
}

/// Every coordinator and worker process; all are killed when dropped.
struct Procs {
    slots: Vec<Slot>,
    dir: PathBuf,
    orchestrix: PathBuf,
    worker: PathBuf,
    urls: String,
    flows: PathBuf,
    /// Worker incarnations SIGKILLed by the schedule.
    killed: HashSet<String>,
    /// Exits nobody asked for (the process was restarted).
    unplanned: Vec<String>,
    /// Still starting up: exits then (e.g. JetStream not ready yet) are no news.
    starting: bool,
    startup_exits: Vec<String>,
    clock: Clock,
}

impl Procs {
    fn slot(&self, role: Role, index: usize) -> usize {
        let base = if role == Role::Coordinator { 0 } else { COORDINATORS };
        base + index
    }

    fn log_path(&self, i: usize, ext: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{}.{ext}", self.slots[i].incarnation()))
    }

    fn ledger_path(&self, i: usize) -> PathBuf {
        self.dir.join("ledgers").join(format!("{}.ledger", self.slots[i].incarnation()))
    }

    /// Where the readiness line shows up, and what it starts with.
    fn ready_marker(&self, i: usize) -> (PathBuf, &'static str) {
        match self.slots[i].role {
            Role::Coordinator => (self.log_path(i, "log"), "coordinator ready"),
            Role::Worker => (self.log_path(i, "out"), "ready "),
        }
    }

    /// Starts slot `i`'s next incarnation.
    fn spawn(&mut self, i: usize) -> Res<()> {
        if self.slots[i].started {
            self.slots[i].generation += 1;
        }
        self.slots[i].started = true;
        self.slots[i].ready = false;
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("cannot open {}: {e}", p.display()))
        };
        let err = open(&self.log_path(i, "log"))?;
        let mut cmd = match self.slots[i].role {
            Role::Coordinator => {
                let mut c = Command::new(&self.orchestrix);
                c.args(["--nats", &self.urls, "serve", "--flows"])
                    .arg(&self.flows)
                    .args(["--store", "jetstream", "--replicas", "3"])
                    .args(["--ack-timeout", "1s", "--heartbeat-timeout", "2s"])
                    .stdout(Stdio::from(err.try_clone().map_err(|e| e.to_string())?));
                c
            }
            Role::Worker => {
                let mut c = Command::new(&self.worker);
                c.args(["--nats", &self.urls, "--ledger"])
                    .arg(self.ledger_path(i))
                    .args(["--heartbeat-ms", "200"])
                    .stdout(Stdio::from(open(&self.log_path(i, "out"))?));
                c
            }
        };
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.slots[i].incarnation()))?;
        self.slots[i].child = Some(child);
        self.slots[i].wanted = true;
        Ok(())
    }

    /// SIGKILLs slot `i` and keeps it down; returns the incarnation killed.
    fn kill(&mut self, i: usize) -> String {
        let name = self.slots[i].incarnation();
        self.slots[i].wanted = false;
        if let Some(mut c) = self.slots[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.slots[i].role == Role::Worker {
            self.killed.insert(name.clone());
        }
        name
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.slots[i].child.as_ref().map(Child::id)
    }

    /// Restarts the wanted processes that exited by themselves.
    fn supervise(&mut self) {
        for i in 0..self.slots.len() {
            if !self.slots[i].wanted {
                continue;
            }
            let exited = match self.slots[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Ok(None)) => None,
                Some(Err(e)) => Some(e.to_string()),
                None => Some("not running".into()),
            };
            if let Some(why) = exited {
                let line = format!(
                    "+{:.1}s {} exited by itself ({why}), restarted",
                    self.clock.secs(),
                    self.slots[i].incarnation()
                );
                self.clock.say(&line);
                if self.starting {
                    self.startup_exits.push(line);
                } else {
                    self.unplanned.push(line);
                }
                if let Err(e) = self.spawn(i) {
                    self.clock.say(format!("restart failed: {e}"));
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Waits until slot `i`'s current incarnation printed its readiness line.
async fn wait_ready(procs: &Mutex<Procs>, i: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let (path, marker, generation) = {
            let p = lock(procs);
            if p.slots[i].ready {
                return true;
            }
            let (path, marker) = p.ready_marker(i);
            (path, marker, p.slots[i].generation)
        };
        if std::fs::read_to_string(&path).is_ok_and(|t| t.lines().any(|l| l.contains(marker))) {
            let mut p = lock(procs);
            if p.slots[i].generation == generation {
                p.slots[i].ready = true;
            }
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_all_ready(procs: &Mutex<Procs>, within: Duration) -> Res<()> {
    for i in 0..COORDINATORS + WORKERS {
        if !wait_ready(procs, i, within).await {
            let name = lock(procs).slots[i].incarnation();
            return Err(format!("{name} is not ready after {within:?} (see its log)"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- NATS

/// The runs stream's leader (a server name, `n0`..`n2`) and whether every
/// replica is current.
async fn runs_stream(nc: &async_nats::Client, within: Duration) -> Res<(Option<String>, bool)> {
    let subject = format!("$JS.API.STREAM.INFO.{RUNS_STREAM}");
    let msg = tokio::time::timeout(within, nc.request(subject, "".into()))
        .await
        .map_err(|_| "stream info: timeout".to_owned())?
        .map_err(|e| format!("stream info: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&msg.payload).map_err(|e| format!("stream info: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!("stream info: {err}"));
    }
    let cluster = &v["cluster"];
    let leader = cluster["leader"].as_str().map(str::to_owned);
    let replicas = cluster["replicas"].as_array().cloned().unwrap_or_default();
    let current = replicas.len() == 2 && replicas.iter().all(|r| r["current"] == true);
    Ok((leader, current))
}

/// Waits for JetStream's meta leader (account info answers without error).
async fn wait_jetstream(nc: &async_nats::Client, within: Duration) -> Res<()> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(
            Duration::from_secs(2),
            nc.request("$JS.API.INFO".to_owned(), "".into()),
        )
        .await
        {
            Ok(Ok(m)) => match serde_json::from_slice::<serde_json::Value>(&m.payload) {
                Ok(v) if v.get("error").is_none() => return Ok(()),
                Ok(v) => last = v["error"].to_string(),
                Err(e) => last = e.to_string(),
            },
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timeout".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("JetStream not available after {within:?}: {last}"))
}

async fn nats_blocking<T: Send + 'static>(
    cluster: &Arc<Mutex<NatsCluster>>,
    f: impl FnOnce(&mut NatsCluster) -> T + Send + 'static,
) -> Res<T> {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&c)))
        .await
        .map_err(|e| format!("nats-server control failed: {e}"))
}

// ---------------------------------------------------------------- faults

#[derive(Debug, Clone)]
enum Fault {
    KillCoordinator {
        index: usize,
        down: Duration,
    },
    KillWorker {
        index: usize,
        down: Duration,
    },
    KillRunsLeader {
        down: Duration,
    },
    StopWorker {
        index: usize,
        stopped: Duration,
    },
    /// SIGSTOP the node leading the runs bucket, then SIGCONT: a node that is
    /// cut off (its clients' connections hang) and comes back with a stale
    /// view, as in a network partition.
    FreezeRunsLeader {
        frozen: Duration,
    },
}

impl Fault {
    fn downtime(&self) -> Duration {
        match self {
            Fault::KillCoordinator { down, .. }
            | Fault::KillWorker { down, .. }
            | Fault::KillRunsLeader { down } => *down,
            Fault::StopWorker { stopped, .. } | Fault::FreezeRunsLeader { frozen: stopped } => {
                *stopped
            }
        }
    }
}

/// Faults in order, each after its pause.
fn schedule(seed: u64, rounds: usize, short: bool) -> Vec<(Duration, Fault)> {
    let mut rng = Rng(seed ^ 0xC4A0_5EED);
    let mut out = Vec::new();
    for _ in 0..rounds {
        let mut kinds = [0u8, 1, 2, 3, 4];
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for k in kinds {
            let gap = if short { rng.ms(2500, 4000) } else { rng.ms(4000, 7000) };
            let fault = match k {
                0 => Fault::KillCoordinator {
                    index: rng.below(COORDINATORS as u64) as usize,
                    down: rng.ms(500, 3000),
                },
                1 => Fault::KillWorker {
                    index: rng.below(WORKERS as u64) as usize,
                    down: rng.ms(500, 2000),
                },
                2 => Fault::KillRunsLeader { down: rng.ms(6000, 8000) },
                3 => Fault::StopWorker {
                    index: rng.below(WORKERS as u64) as usize,
                    stopped: rng.ms(3000, 5000),
                },
                _ => Fault::FreezeRunsLeader { frozen: rng.ms(6000, 9000) },
            };
            out.push((gap, fault));
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
struct FaultLog {
    at_secs: f64,
    fault: String,
    done: bool,
    note: String,
}

struct Env {
    procs: Arc<Mutex<Procs>>,
    cluster: Arc<Mutex<NatsCluster>>,
    nc: async_nats::Client,
    clock: Clock,
}

/// The runs stream's leader and its node index, once every replica is
/// current (otherwise a fault on it may take the quorum, which tells nothing
/// about the engine); `None` after 30 s.
async fn current_leader(env: &Env) -> Option<(String, usize)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        match runs_stream(&env.nc, Duration::from_secs(3)).await {
            Ok((Some(l), true)) => break l,
            _ if Instant::now() > deadline => return None,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let node = leader.strip_prefix('n').and_then(|n| n.parse::<usize>().ok())?;
    Some((leader, node))
}

/// SIGSTOP `pid` for `how_long`, then SIGCONT, saying so.
async fn freeze(env: &Env, pid: u32, name: &str, how_long: Duration) -> Res<()> {
    signal(pid, "STOP")?;
    env.clock.say(format!("SIGSTOP {name} for {how_long:?}"));
    tokio::time::sleep(how_long).await;
    signal(pid, "CONT")?;
    env.clock.say(format!("SIGCONT {name}"));
    Ok(())
}

async fn inject(env: &Env, fault: &Fault) -> Res<FaultLog> {
    let at_secs = env.clock.secs();
    let log = |fault: String, done: bool, note: String| FaultLog { at_secs, fault, done, note };
    match fault {
        Fault::KillCoordinator { index, down } | Fault::KillWorker { index, down } => {
            let role = if matches!(fault, Fault::KillCoordinator { .. }) {
                Role::Coordinator
            } else {
                Role::Worker
            };
            let i = lock(&env.procs).slot(role, *index);
            let name = lock(&env.procs).kill(i);
            env.clock.say(format!("SIGKILL {name}; restart in {down:?}"));
            tokio::time::sleep(*down).await;
            lock(&env.procs).spawn(i)?;
            let ready = wait_ready(&env.procs, i, Duration::from_secs(60)).await;
            let now = lock(&env.procs).slots[i].incarnation();
            env.clock.say(format!("{now} started (ready: {ready})"));
            let what =
                format!("SIGKILL {name}, restarted after {:.1} s as {now}", down.as_secs_f64());
            Ok(log(what, true, if ready { String::new() } else { "not ready in 60 s".into() }))
        }
        Fault::StopWorker { index, stopped } => {
            let i = lock(&env.procs).slot(Role::Worker, *index);
            let (pid, name) = {
                let p = lock(&env.procs);
                (p.pid(i), p.slots[i].incarnation())
            };
            let Some(pid) = pid else {
                return Ok(log(format!("SIGSTOP {name}"), false, "not running".into()));
            };
            freeze(env, pid, &name, *stopped).await?;
            let what = format!("SIGSTOP {name} for {:.1} s, then SIGCONT", stopped.as_secs_f64());
            Ok(log(what, true, String::new()))
        }
        Fault::FreezeRunsLeader { frozen } => {
            let Some((leader, node)) = current_leader(env).await else {
                let what = "SIGSTOP the runs stream's leader".to_owned();
                return Ok(log(
                    what,
                    false,
                    "skipped: no leader with current replicas in 30 s".into(),
                ));
            };
            let pid = nats_blocking(&env.cluster, move |c| c.nodes[node].pid()).await?;
            let Some(pid) = pid else {
                return Ok(log(format!("SIGSTOP node {leader}"), false, "not running".into()));
            };
            freeze(env, pid, &format!("nats node {leader} (runs leader)"), *frozen).await?;
            let what = format!(
                "SIGSTOP nats node {leader} (runs leader) for {:.1} s, then SIGCONT",
                frozen.as_secs_f64()
            );
            Ok(log(what, true, String::new()))
        }
        Fault::KillRunsLeader { down } => {
            let Some((leader, node)) = current_leader(env).await else {
                let what = "SIGKILL the runs stream's leader".to_owned();
                return Ok(log(
                    what,
                    false,
                    "skipped: no leader with current replicas in 30 s".into(),
                ));
            };
            nats_blocking(&env.cluster, move |c| c.nodes[node].kill()).await?;
            env.clock.say(format!("SIGKILL nats node {leader} (runs leader); restart in {down:?}"));
            let killed_at = Instant::now();
            let mut note = String::new();
            let mut last = String::new();
            while killed_at.elapsed() < *down {
                if note.is_empty() {
                    // Short requests: the time to a new leader is measured.
                    match runs_stream(&env.nc, Duration::from_millis(500)).await {
                        Ok((Some(l), _)) if l != leader => {
                            note = format!(
                                "new leader {l} after {:.1} s",
                                killed_at.elapsed().as_secs_f64()
                            );
                            env.clock.say(&note);
                        }
                        Ok((l, _)) => last = format!("leader {l:?}"),
                        Err(e) => last = e,
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            nats_blocking(&env.cluster, move |c| c.nodes[node].restart()).await?;
            env.clock.say(format!("nats node {leader} restarted"));
            if note.is_empty() {
                note = format!("no new leader while it was down (last: {last})");
            }
            let what = format!(
                "SIGKILL nats node {leader} (runs leader), restarted after {:.1} s",
                down.as_secs_f64()
            );
            Ok(log(what, true, note))
        }
    }
}

async fn run_schedule(env: &Env, plan: &[(Duration, Fault)]) -> Res<Vec<FaultLog>> {
    let mut logs = Vec::new();
    for (gap, fault) in plan {
        tokio::time::sleep(*gap).await;
        // One fault at a time, each on a whole system.
        if let Err(e) = wait_all_ready(&env.procs, Duration::from_secs(60)).await {
            env.clock.say(format!("before the next fault: {e}"));
        }
        logs.push(inject(env, fault).await?);
    }
    Ok(logs)
}

// ---------------------------------------------------------------- runs

#[derive(Debug)]
struct RunRec {
    input: ChaosInput,
    run_id: Option<Uuid>,
    start_attempts: u32,
    start_error: Option<String>,
    /// A status query answered "unknown run" at some point.
    ever_unknown: bool,
    report: Option<RunReport>,
}

enum Answer {
    Report(Box<RunReport>),
    Unknown,
    Error(String),
}

/// `running [reserve completed/1, charge running/2, notify not_run/0]`: the
/// run's status, then each step's status and attempts.
fn describe(r: &RunReport) -> String {
    let steps: Vec<String> = r
        .steps
        .iter()
        .map(|s| format!("{} {}/{}", s.name, s.status.as_str(), s.attempts))
        .collect();
    format!("{} [{}]", r.status.as_str(), steps.join(", "))
}

async fn ask_status(client: &Client, run_id: Uuid) -> Answer {
    match tokio::time::timeout(Duration::from_secs(6), client.status(run_id.into())).await {
        Ok(Ok(r)) => Answer::Report(Box::new(r)),
        Ok(Err(e)) if e.rejection() == Some(Rejection::UnknownRun) => Answer::Unknown,
        Ok(Err(e)) => Answer::Error(e.to_string()),
        Err(_) => Answer::Error("status: timeout".into()),
    }
}

/// Starts one run (retrying with its key), then follows it for a while.
async fn drive(client: Client, key: String, input: ChaosInput) -> RunRec {
    let mut rec = RunRec {
        input,
        run_id: None,
        start_attempts: 0,
        start_error: None,
        ever_unknown: false,
        report: None,
    };
    let began = Instant::now();
    loop {
        rec.start_attempts += 1;
        let start = client.start(FLOW, &rec.input, RunOptions::new().key(key.clone()));
        match tokio::time::timeout(Duration::from_secs(10), start).await {
            Ok(Ok(id)) => {
                rec.run_id = Some(id.into());
                rec.start_error = None;
                break;
            }
            Ok(Err(e)) => rec.start_error = Some(e.to_string()),
            Err(_) => rec.start_error = Some("start: timeout".into()),
        }
        if began.elapsed() > START_RETRY_FOR {
            break;
        }
        let pause = 250 * u64::from(rec.start_attempts.min(8));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let Some(id) = rec.run_id else { return rec };
    let until = Instant::now() + FOLLOW_FOR;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match ask_status(&client, id).await {
            Answer::Report(r) if r.status.is_terminal() => {
                rec.report = Some(*r);
                break;
            }
            Answer::Unknown => rec.ever_unknown = true,
            _ => {}
        }
    }
    rec
}

fn inputs(seed: u64, n: usize) -> Vec<ChaosInput> {
    let mut rng = Rng(seed);
    (0..n as u64).map(|id| ChaosInput { id, fail: id % 4 == 3, delay_ms: rng.below(301) }).collect()
}

/// Starts every run, evenly spread over `spread`, at most `concurrency` in flight.
async fn dispatch(
    client: &Client,
    seed: u64,
    inputs: Vec<ChaosInput>,
    concurrency: usize,
    spread: Duration,
    clock: Clock,
) -> Vec<RunRec> {
    let n = inputs.len().max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let t0 = tokio::time::Instant::now();
    let mut handles = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        tokio::time::sleep_until(t0 + spread.mul_f64(i as f64 / n as f64)).await;
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        if i % 100 == 0 {
            clock.say(format!("starting run {i}"));
        }
        let client = client.clone();
        let key = format!("chaos-{seed}-{i}");
        handles.push(tokio::spawn(async move {
            let rec = drive(client, key, input).await;
            drop(permit);
            rec
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        match h.await {
            Ok(r) => out.push(r),
            Err(e) => clock.say(format!("a run task failed: {e}")),
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Terminal,
    Lost,
    Stuck,
}

/// A run to see to the end: one the harness started, or one only the ledger knows.
struct Tracked {
    run_id: Uuid,
    /// Index into the started runs; `None` for a stray run.
    rec: Option<usize>,
    report: Option<RunReport>,
    last: String,
    unknown_since: Option<Instant>,
    fate: Option<Fate>,
}

/// Polls every unfinished run until it ends or `within` passes.
async fn settle(client: &Client, tracked: &mut [Tracked], within: Duration, clock: Clock) {
    let deadline = Instant::now() + within;
    loop {
        let pending: Vec<usize> =
            (0..tracked.len()).filter(|&i| tracked[i].fate.is_none()).collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for &i in &pending {
                let t = &mut tracked[i];
                t.fate = Some(if t.last == "unknown run" { Fate::Lost } else { Fate::Stuck });
            }
            break;
        }
        clock.say(format!("waiting for {} runs to end", pending.len()));
        let ids: Vec<(usize, Uuid)> = pending.iter().map(|&i| (i, tracked[i].run_id)).collect();
        // Answers still out at the deadline are not waited for.
        let mut answers: Vec<(usize, Answer)> = Vec::new();
        let round = futures::stream::iter(ids)
            .map(|(i, id)| async move { (i, ask_status(client, id).await) })
            .buffer_unordered(16)
            .for_each(|a| {
                answers.push(a);
                async {}
            });
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let _ = tokio::time::timeout(left, round).await;
        for (i, a) in answers {
            let t = &mut tracked[i];
            match a {
                Answer::Report(r) => {
                    t.unknown_since = None;
                    t.last = describe(&r);
                    if r.status.is_terminal() {
                        t.fate = Some(Fate::Terminal);
                    }
                    t.report = Some(*r);
                }
                Answer::Unknown => {
                    t.last = "unknown run".into();
                    let since = *t.unknown_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNKNOWN_FOR {
                        t.fate = Some(Fate::Lost);
                    }
                }
                Answer::Error(e) => {
                    t.unknown_since = None;
                    t.last = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------- ledger

#[derive(Debug, Clone)]
struct Line {
    kind: String,
    run: Uuid,
    step: String,
    command: String,
    incarnation: String,
}

/// Every ledger line, and the malformed ones.
fn read_ledgers(dir: &Path) -> Res<(Vec<Line>, Vec<String>)> {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(incarnation) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for raw in text.lines() {
            let f: Vec<&str> = raw.split(' ').collect();
            let run = f.get(1).and_then(|r| r.parse::<Uuid>().ok());
            match (f.as_slice(), run) {
                ([kind @ ("exec" | "fail" | "comp"), _, step, _, command, _], Some(run)) => {
                    lines.push(Line {
                        kind: (*kind).to_owned(),
                        run,
                        step: (*step).to_owned(),
                        command: (*command).to_owned(),
                        incarnation: incarnation.clone(),
                    });
                }
                _ => bad.push(format!("{incarnation}: {raw:?}")),
            }
        }
    }
    Ok((lines, bad))
}

// ---------------------------------------------------------------- report

#[derive(Debug, Default, Clone, Serialize)]
struct Histogram {
    step: String,
    once: usize,
    twice: usize,
    three_or_more: usize,
}

impl Histogram {
    fn of(step: &str) -> Self {
        Histogram { step: step.to_owned(), ..Histogram::default() }
    }

    fn add(&mut self, n: usize) {
        match n {
            0 => {}
            1 => self.once += 1,
            2 => self.twice += 1,
            _ => self.three_or_more += 1,
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct Report {
    seed: u64,
    runs_requested: usize,
    seconds: f64,
    work_dir: Option<String>,
    faults: Vec<FaultLog>,
    /// Processes that exited while the system was starting (restarted).
    startup_exits: Vec<String>,
    /// Processes that exited by themselves later (restarted).
    unplanned_exits: Vec<String>,
    /// Starts accepted.
    started: usize,
    /// Start requests made (retries included).
    start_requests: u32,
    /// Starts not accepted within 60 s of retries with the same key.
    not_accepted: Vec<String>,
    terminal: usize,
    by_status: BTreeMap<String, usize>,
    /// `fail: true` runs by status.
    failing_inputs_by_status: BTreeMap<String, usize>,
    /// `fail: false` runs by status.
    passing_inputs_by_status: BTreeMap<String, usize>,
    lost: Vec<String>,
    stuck: Vec<String>,
    /// Runs that answered "unknown run" at some point but not in the end.
    transiently_unknown: usize,
    /// Runs in the ledger that no accepted start returned.
    stray_runs: Vec<String>,
    exec_lines: usize,
    fail_lines: usize,
    comp_lines: usize,
    /// Per step: how many runs executed its action once, twice, 3+ times.
    executions: Vec<Histogram>,
    /// Per step: how many runs ran its compensation once, twice, 3+ times.
    compensations: Vec<Histogram>,
    /// Command ids executed more than once.
    duplicates: usize,
    duplicates_explained_by_killed_worker: usize,
    unexplained_duplicates: Vec<String>,
    /// Steps whose report says `unknown` (or whose error mentions it).
    unknown_outcomes: usize,
    /// Steps of a run that did not complete, executed, without a compensation.
    uncompensated: Vec<String>,
    /// Compensations in runs that completed (informational).
    compensations_in_completed_runs: usize,
    /// Completed runs with a step the ledger never saw executed.
    completed_without_execution: Vec<String>,
    /// `fail: true` runs reported completed (notify cannot succeed).
    impossible_completions: Vec<String>,
    malformed_ledger_lines: Vec<String>,
    pass: bool,
    findings: Vec<String>,
}

fn bump(m: &mut BTreeMap<String, usize>, k: &str) {
    *m.entry(k.to_owned()).or_default() += 1;
}

/// Steps of a report whose outcome is unknown.
fn unknown_steps(report: &RunReport) -> usize {
    let Ok(v) = serde_json::to_value(report) else { return 0 };
    let mentions = |e: &serde_json::Value| {
        e.as_str().is_some_and(|s| s.to_ascii_lowercase().contains("unknown"))
    };
    v["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| {
                    s["status"] == "unknown"
                        || mentions(&s["error"])
                        || mentions(&s["compensation"]["error"])
                })
                .count()
        })
        .unwrap_or(0)
}

fn analyse(
    report: &mut Report,
    recs: &[RunRec],
    tracked: &[Tracked],
    lines: &[Line],
    killed: &HashSet<String>,
) {
    report.started = recs.iter().filter(|r| r.run_id.is_some()).count();
    report.start_requests = recs.iter().map(|r| r.start_attempts).sum();
    report.not_accepted = recs
        .iter()
        .filter(|r| r.run_id.is_none())
        .map(|r| format!("input {}: {}", r.input.id, r.start_error.as_deref().unwrap_or("?")))
        .collect();
    report.executions = STEPS.map(Histogram::of).to_vec();
    report.compensations = STEPS.map(Histogram::of).to_vec();
    let mut by_run: HashMap<Uuid, Vec<&Line>> = HashMap::new();
    for l in lines {
        by_run.entry(l.run).or_default().push(l);
    }
    let count = |run: &Uuid, kinds: &[&str], step: &str| {
        by_run.get(run).map_or(0, |ls| {
            ls.iter().filter(|l| l.step == step && kinds.contains(&l.kind.as_str())).count()
        })
    };
    for t in tracked {
        let id = t.run_id.to_string();
        let input = t.rec.map(|i| &recs[i].input);
        match t.fate {
            Some(Fate::Lost) => report.lost.push(id.clone()),
            Some(Fate::Stuck) | None => report.stuck.push(format!("{id} (last: {})", t.last)),
            Some(Fate::Terminal) => {}
        }
        if t.rec.is_none() {
            report.stray_runs.push(format!("{id} ({})", t.last));
        }
        if t.rec.is_some_and(|i| recs[i].ever_unknown) && t.fate == Some(Fate::Terminal) {
            report.transiently_unknown += 1;
        }
        for (k, step) in STEPS.iter().enumerate() {
            report.executions[k].add(count(&t.run_id, &["exec", "fail"], step));
            report.compensations[k].add(count(&t.run_id, &["comp"], step));
        }
        let Some(r) = t.report.as_ref().filter(|_| t.fate == Some(Fate::Terminal)) else {
            continue;
        };
        report.terminal += 1;
        let status = r.status.as_str();
        bump(&mut report.by_status, status);
        match input {
            Some(i) if i.fail => bump(&mut report.failing_inputs_by_status, status),
            Some(_) => bump(&mut report.passing_inputs_by_status, status),
            None => {}
        }
        report.unknown_outcomes += unknown_steps(r);
        if status == "completed" {
            if input.is_some_and(|i| i.fail) {
                report.impossible_completions.push(id.clone());
            }
            for step in STEPS {
                report.compensations_in_completed_runs += count(&t.run_id, &["comp"], step);
                if count(&t.run_id, &["exec"], step) == 0 {
                    report.completed_without_execution.push(format!("{id} {step}"));
                }
            }
        } else {
            // Every compensable step that may have had its effect must have
            // had its compensation started at least once.
            for step in STEPS {
                if count(&t.run_id, &["exec"], step) > 0 && count(&t.run_id, &["comp"], step) == 0 {
                    report.uncompensated.push(format!("{id} {step} (run {status})"));
                }
            }
        }
    }
    report.exec_lines = lines.iter().filter(|l| l.kind == "exec").count();
    report.fail_lines = lines.iter().filter(|l| l.kind == "fail").count();
    report.comp_lines = lines.iter().filter(|l| l.kind == "comp").count();
    let mut by_command: HashMap<&str, Vec<&Line>> = HashMap::new();
    for l in lines {
        by_command.entry(&l.command).or_default().push(l);
    }
    let mut dups: Vec<_> = by_command.into_iter().filter(|(_, ls)| ls.len() > 1).collect();
    dups.sort_by(|a, b| a.0.cmp(b.0));
    for (command, ls) in dups {
        report.duplicates += 1;
        // An execution on a process killed later may have been cut short
        // before its outcome went out: running the command again is expected.
        // Two on processes that lived on are not.
        let survivors = ls.iter().filter(|l| !killed.contains(&l.incarnation)).count();
        if survivors <= 1 {
            report.duplicates_explained_by_killed_worker += 1;
        } else {
            let on: Vec<&str> = ls.iter().map(|l| l.incarnation.as_str()).collect();
            let l = ls[0];
            report.unexplained_duplicates.push(format!(
                "{} {} {} command {command} on {}",
                l.kind,
                l.run,
                l.step,
                on.join(", ")
            ));
        }
    }
}

fn verdict(report: &mut Report) {
    let mut f = Vec::new();
    let mut check = |n: usize, what: &str| {
        if n > 0 {
            f.push(format!("{n} {what}"));
        }
    };
    check(report.lost.len(), "lost runs");
    check(report.stuck.len(), "stuck runs");
    check(report.unexplained_duplicates.len(), "unexplained duplicate executions");
    check(report.uncompensated.len(), "maybe-done steps left uncompensated");
    check(report.not_accepted.len(), "starts not accepted within 60 s");
    check(report.stray_runs.len(), "stray runs (executed, but no accepted start returned them)");
    check(report.impossible_completions.len(), "fail: true runs reported completed");
    check(report.completed_without_execution.len(), "completed steps never executed");
    check(report.malformed_ledger_lines.len(), "malformed ledger lines");
    report.pass = f.is_empty();
    report.findings = f;
}

fn print_table(r: &Report) {
    let row = |k: &str, v: String| println!("  {k:<44} {v}");
    let list = |items: &[String]| {
        for i in items.iter().take(20) {
            println!("      {i}");
        }
        if items.len() > 20 {
            println!("      ... and {} more (all in --json)", items.len() - 20);
        }
    };
    println!();
    println!("chaos: seed {}, {} runs, {:.0} s", r.seed, r.runs_requested, r.seconds);
    println!("faults ({} done)", r.faults.iter().filter(|f| f.done).count());
    for f in &r.faults {
        let note = if f.note.is_empty() { String::new() } else { format!("  [{}]", f.note) };
        let skipped = if f.done { "" } else { "SKIPPED " };
        println!("  +{:6.1}s  {skipped}{}{note}", f.at_secs, f.fault);
    }
    if !r.startup_exits.is_empty() {
        println!("exits while starting up: {} (restarted)", r.startup_exits.len());
    }
    if !r.unplanned_exits.is_empty() {
        println!("unplanned exits ({})", r.unplanned_exits.len());
        list(&r.unplanned_exits);
    }
    println!("runs");
    row("started (accepted)", r.started.to_string());
    row("start requests (retries included)", r.start_requests.to_string());
    row("starts not accepted", r.not_accepted.len().to_string());
    list(&r.not_accepted);
    row("terminal", r.terminal.to_string());
    for (s, n) in &r.by_status {
        row(&format!("  {s}"), n.to_string());
    }
    let fmt = |m: &BTreeMap<String, usize>| {
        m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    };
    row("  of runs with fail: false", fmt(&r.passing_inputs_by_status));
    row("  of runs with fail: true", fmt(&r.failing_inputs_by_status));
    row("lost (accepted, then unknown)", r.lost.len().to_string());
    list(&r.lost);
    row("stuck (not terminal at the end)", r.stuck.len().to_string());
    list(&r.stuck);
    row("stray (in the ledger only)", r.stray_runs.len().to_string());
    list(&r.stray_runs);
    row("answered \"unknown run\" for a while", r.transiently_unknown.to_string());
    println!("ledger");
    row(
        "lines exec / fail / comp",
        format!("{} / {} / {}", r.exec_lines, r.fail_lines, r.comp_lines),
    );
    println!("  {:<44} {:>8} {:>8} {:>8}", "(run, step) executed", "once", "twice", "3+");
    for h in &r.executions {
        println!(
            "  {:<44} {:>8} {:>8} {:>8}",
            format!("  {}", h.step),
            h.once,
            h.twice,
            h.three_or_more
        );
    }
    println!("  {:<44} {:>8} {:>8} {:>8}", "(run, step) compensated", "once", "twice", "3+");
    for h in &r.compensations {
        println!(
            "  {:<44} {:>8} {:>8} {:>8}",
            format!("  {}", h.step),
            h.once,
            h.twice,
            h.three_or_more
        );
    }
    row("compensations in completed runs", r.compensations_in_completed_runs.to_string());
    row("duplicates (one command id run twice+)", r.duplicates.to_string());
    row("  explained by a killed worker", r.duplicates_explained_by_killed_worker.to_string());
    row("  unexplained", r.unexplained_duplicates.len().to_string());
    list(&r.unexplained_duplicates);
    row("unknown outcomes (steps)", r.unknown_outcomes.to_string());
    row("maybe-done steps left uncompensated", r.uncompensated.len().to_string());
    list(&r.uncompensated);
    row("completed steps never executed", r.completed_without_execution.len().to_string());
    list(&r.completed_without_execution);
    row("fail: true runs reported completed", r.impossible_completions.len().to_string());
    list(&r.impossible_completions);
    row("malformed ledger lines", r.malformed_ledger_lines.len().to_string());
    list(&r.malformed_ledger_lines);
    if let Some(d) = &r.work_dir {
        println!("logs and ledgers: {d}");
    }
    if r.pass {
        println!("verdict: PASS");
    } else {
        println!("verdict: FAIL: {}", r.findings.join("; "));
    }
}

// ---------------------------------------------------------------- main

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The newest modification time of the `.rs` files under `dir`.
fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// Warns when the engine's sources are newer than the binary under test.
fn warn_if_stale(bin: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let newest = ["coordinator/src", "proto/src", "worker-sdk/src", "src"]
        .iter()
        .filter_map(|d| newest_source(&root.join(d)))
        .max();
    if let (Some(b), Some(n)) = (built, newest)
        && n > b
    {
        eprintln!(
            "warning: {} is older than the engine's sources: rebuild it \
                 (cargo build [--release] -p orchestrix-coordinator --bins) or the old engine \
                 is tested",
            bin.display()
        );
    }
}

struct Setup {
    runs: usize,
    rounds: usize,
    settle: Duration,
    short: bool,
}

async fn harness(args: &Args, setup: &Setup, dir: &Path, clock: Clock) -> Res<Report> {
    let orchestrix = args.orchestrix.clone().unwrap_or_else(|| sibling("orchestrix"));
    let worker = args.worker.clone().unwrap_or_else(|| sibling("ledger_worker"));
    for (bin, what) in [(&orchestrix, "orchestrix"), (&worker, "ledger_worker")] {
        if !bin.exists() {
            return Err(format!(
                "{what} not found at {}: build with `cargo build -p orchestrix-coordinator \
                 -p orchestrix-integration-tests --bins` (add --release for a release chaos)",
                bin.display()
            ));
        }
    }
    warn_if_stale(&orchestrix);
    for sub in ["logs", "ledgers"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let flows = dir.join("chaos-flow.toml");
    let toml: String = std::iter::once(FLOW_FILE.to_owned()).chain(STEPS.map(step_toml)).collect();
    std::fs::write(&flows, toml).map_err(|e| format!("{}: {e}", flows.display()))?;

    clock.say("starting a 3-node nats cluster");
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .map_err(|e| format!("cannot start the nats cluster: {e}"))?;
    let urls = cluster.urls();
    let cluster = Arc::new(Mutex::new(cluster));
    let nc = NatsOptions::new(urls.clone())
        .name("chaos harness")
        .connect()
        .await
        .map_err(|e| format!("cannot connect to the cluster: {e}"))?;
    wait_jetstream(&nc, Duration::from_secs(60)).await?;

    let slots = (0..COORDINATORS)
        .map(|i| (Role::Coordinator, i))
        .chain((0..WORKERS).map(|i| (Role::Worker, i)))
        .map(|(role, index)| Slot {
            role,
            index,
            generation: 0,
            started: false,
            ready: false,
            child: None,
            wanted: false,
        })
        .collect();
    let procs = Arc::new(Mutex::new(Procs {
        slots,
        dir: dir.to_owned(),
        orchestrix,
        worker,
        urls: urls.clone(),
        flows,
        killed: HashSet::new(),
        unplanned: Vec::new(),
        starting: true,
        startup_exits: Vec::new(),
        clock,
    }));
    clock.say("starting 3 coordinators and 3 workers");
    // The first coordinator makes the buckets; then the others.
    lock(&procs).spawn(0)?;
    let supervisor = {
        let procs = procs.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                lock(&procs).supervise();
            }
        }))
    };
    if !wait_ready(&procs, 0, Duration::from_secs(90)).await {
        return Err("the first coordinator is not ready after 90 s (see logs/c0.*.log)".into());
    }
    for i in 1..COORDINATORS + WORKERS {
        lock(&procs).spawn(i)?;
    }
    wait_all_ready(&procs, Duration::from_secs(90)).await?;

    let client = Client::connect(&NatsOptions::new(urls.clone()))
        .await
        .map_err(|e| format!("cannot connect the client: {e}"))?;
    // One run first: the whole setup works, or nothing else is worth doing.
    clock.say("warm-up run");
    let warm = drive(
        client.clone(),
        format!("chaos-{}-warm-up", args.seed),
        ChaosInput { id: u64::MAX, fail: false, delay_ms: 0 },
    )
    .await;
    let warm_id = match (&warm.run_id, &warm.report) {
        (Some(id), Some(r)) if r.status.as_str() == "completed" => *id,
        _ => return Err(format!("the warm-up run did not complete: {warm:?}")),
    };

    let plan = schedule(args.seed, setup.rounds, setup.short);
    let spread: Duration =
        plan.iter().map(|(gap, f)| *gap + f.downtime() + Duration::from_secs(1)).sum();
    clock.say(format!(
        "{} runs over {:.0} s, {} faults (seed {})",
        setup.runs,
        spread.as_secs_f64(),
        plan.len(),
        args.seed
    ));
    lock(&procs).starting = false;
    let env = Env { procs: procs.clone(), cluster: cluster.clone(), nc: nc.clone(), clock };
    let (recs, faults) = tokio::join!(
        dispatch(
            &client,
            args.seed,
            inputs(args.seed, setup.runs),
            args.concurrency,
            spread,
            clock
        ),
        run_schedule(&env, &plan)
    );
    let faults = faults?;
    clock.say("faults over; waiting for every process to be back");
    wait_all_ready(&procs, Duration::from_secs(90)).await?;

    // Every run the harness started, and any other the ledger saw.
    let ledger_dir = dir.join("ledgers");
    let mut tracked: Vec<Tracked> = Vec::new();
    let track = |run_id, rec: Option<usize>, report: Option<RunReport>| Tracked {
        run_id,
        rec,
        fate: report.as_ref().filter(|r| r.status.is_terminal()).map(|_| Fate::Terminal),
        last: report.as_ref().map(describe).unwrap_or_default(),
        report,
        unknown_since: None,
    };
    for (i, r) in recs.iter().enumerate() {
        if let Some(id) = r.run_id {
            tracked.push(track(id, Some(i), r.report.clone()));
        }
    }
    let mut known: HashSet<Uuid> = tracked.iter().map(|t| t.run_id).collect();
    known.insert(warm_id);
    let (lines, _) = read_ledgers(&ledger_dir)?;
    for l in &lines {
        if known.insert(l.run) {
            tracked.push(track(l.run, None, None));
        }
    }
    settle(&client, &mut tracked, setup.settle, clock).await;
    // Let late executions reach the ledger before reading it for good.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (lines, bad) = read_ledgers(&ledger_dir)?;
    for l in &lines {
        if known.insert(l.run) {
            tracked.push(track(l.run, None, None));
        }
    }
    settle(&client, &mut tracked, Duration::from_secs(10), clock).await;
    let lines: Vec<Line> = lines.into_iter().filter(|l| l.run != warm_id).collect();

    drop(supervisor);
    let (killed, unplanned, startup_exits) = {
        let p = lock(&procs);
        (p.killed.clone(), p.unplanned.clone(), p.startup_exits.clone())
    };
    let mut report = Report {
        seed: args.seed,
        runs_requested: setup.runs,
        faults,
        unplanned_exits: unplanned,
        startup_exits,
        malformed_ledger_lines: bad,
        ..Report::default()
    };
    analyse(&mut report, &recs, &tracked, &lines, &killed);
    verdict(&mut report);
    clock.say("stopping every process");
    drop(env);
    drop(procs);
    drop(cluster);
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let setup = Setup {
        runs: args.runs.unwrap_or(if args.short { 200 } else { 1000 }),
        rounds: args.rounds.unwrap_or(if args.short { 1 } else { 3 }),
        settle: Duration::from_secs(args.settle_secs.unwrap_or(if args.short { 60 } else { 120 })),
        short: args.short,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let (temp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => match tempfile::Builder::new().prefix("orchestrix-chaos-").tempdir() {
            Ok(t) => {
                let p = t.path().to_owned();
                (Some(t), p)
            }
            Err(e) => {
                eprintln!("error: cannot make a temp dir: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let clock = Clock(Instant::now());
    let result = runtime.block_on(async {
        tokio::select! {
            r = harness(&args, &setup, &dir, clock) => r,
            _ = orchestrix::worker::wait_for_signal() => Err("interrupted".to_owned()),
        }
    });
    // Every process is gone once the harness future is dropped.
    drop(runtime);
    let keep = !matches!(&result, Ok(r) if r.pass);
    let kept = match temp {
        Some(t) if keep => Some(t.keep()),
        Some(t) => {
            drop(t);
            None
        }
        None => Some(dir.clone()),
    };
    match result {
        Ok(mut report) => {
            report.seconds = clock.secs();
            report.work_dir = kept.map(|d| d.display().to_string());
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("error: cannot write JSON: {e}"),
                }
            } else {
                print_table(&report);
            }
            let _ = std::io::stdout().flush();
            if report.pass { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(d) = kept {
                eprintln!("logs and ledgers: {}", d.display());
            }
            ExitCode::from(2)
        }
    }
}
