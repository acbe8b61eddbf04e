//! Test harness: real `nats-server` processes on free loopback ports, and the
//! workspace's binaries.
//!
//! The server binary is `$NATS_SERVER_BIN`, else `nats-server` on the PATH
//! (`scripts/test.sh` installs one). Every server binds 127.0.0.1 only, keeps
//! its JetStream data in a temp dir, and is killed when dropped.

#![allow(clippy::unwrap_used)]

pub mod frozen;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `nats-server` child process with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> NatsServer {
        Self::start_with(Vec::new())
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(extra: Vec<String>) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = NatsServer { child: None, port: free_port(), dir, extra };
        s.spawn();
        s
    }

    /// Starts a server with a configuration file holding `config`
    /// (e.g. `ping_interval: "300ms"`); address, port and store stay the harness's.
    pub fn start_with_config(config: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("server.conf");
        std::fs::write(&path, config).expect("config written");
        let extra = vec!["-c".to_owned(), path.display().to_string()];
        let mut s = NatsServer { child: None, port: free_port(), dir, extra };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e} (run ./scripts/test.sh, or set NATS_SERVER_BIN)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process's id, while it runs (to freeze it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    }
}

/// A binary or example built by `cargo build --workspace --bins --examples`
/// (which `scripts/test.sh` runs before the tests), e.g. `"orchestrix"` or
/// `"examples/payment_worker"`.
pub fn built(rel: &str) -> PathBuf {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let path = target_dir().join(profile).join(rel);
    assert!(
        path.exists(),
        "{} is not built: run ./scripts/test.sh (or cargo build --workspace --bins --examples)",
        path.display()
    );
    path
}

/// Waits until `n` live workers serve `version` (of any flow) in the
/// coordinator's registry view: the moment a test can rely on it.
pub async fn workers_registered(
    coordinator: &orchestrix_coordinator::Coordinator,
    version: &str,
    n: usize,
) {
    let registry = coordinator.registry().expect("the coordinator follows the registry");
    eventually(Duration::from_secs(10), &format!("{n} workers to register {version}"), || {
        registry
            .versions()
            .iter()
            .any(|v| &*v.registration.version == version && v.workers.len() == n)
    })
    .await;
}

/// Waits until `cond` holds, checking every 10 ms, for at most `within`.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lines of a child's output, collected as they come.
type Lines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Collects the lines of `out` into a new [`Lines`] until it closes.
fn collect(
    out: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Lines, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncBufReadExt;
    let lines = Lines::default();
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

/// A child process whose stdout lines (and stderr's, if asked) are
/// collected as they come.
#[derive(Debug)]
pub struct ChildProcess {
    child: tokio::process::Child,
    lines: Lines,
    /// Reads stdout until it closes.
    reader: Option<tokio::task::JoinHandle<()>>,
    errors: Option<Lines>,
}

impl ChildProcess {
    /// Spawns `program` with `args`, collecting stdout; stderr is inherited
    /// only when `ORCHESTRIX_TEST_VERBOSE` is set.
    pub fn spawn(program: &Path, args: &[&str]) -> ChildProcess {
        Self::spawn_with_env(program, args, &[])
    }

    /// Like [`ChildProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
        Self::start(program, args, env, &[], false)
    }

    /// Like [`ChildProcess::spawn_with_env`], collecting stderr too (see
    /// [`ChildProcess::stderr_lines`]), without the variables in `unset`.
    pub fn spawn_capturing_stderr(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> ChildProcess {
        Self::start(program, args, env, unset, true)
    }

    fn start(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
        capture_stderr: bool,
    ) -> ChildProcess {
        let stderr = if capture_stderr {
            Stdio::piped()
        } else if std::env::var_os("ORCHESTRIX_TEST_VERBOSE").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let mut command = tokio::process::Command::new(program);
        for var in unset {
            command.env_remove(var);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let (lines, reader) = collect(child.stdout.take().expect("piped stdout"));
        let errors = child.stderr.take().map(|e| collect(e).0);
        ChildProcess { child, lines, reader: Some(reader), errors }
    }

    /// Lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Lines written to stderr so far (spawned with
    /// [`ChildProcess::spawn_capturing_stderr`]; none otherwise).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.errors.as_ref().map(|e| e.lock().unwrap().clone()).unwrap_or_default()
    }

    /// Lines printed so far that start with `prefix`.
    pub fn lines_starting(&self, prefix: &str) -> Vec<String> {
        self.lines().into_iter().filter(|l| l.starts_with(prefix)).collect()
    }

    /// Waits until a line starting with `prefix` was printed.
    pub async fn wait_for_line(&self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line starting with {prefix:?} within {within:?}; got {:?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends a signal (`"KILL"`, `"STOP"`, `"CONT"`, `"TERM"`) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    /// Once it has, every line it printed is in [`ChildProcess::lines`].
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let status =
            tokio::time::timeout(within, self.child.wait()).await.expect("process exits in time");
        // The exit can be seen before the last lines are read.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status.ok()?.code()
    }
}

/// A cluster of `nats-server` processes with JetStream, routes between them
/// on loopback, each with its own store.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, in order.
    pub nodes: Vec<NatsServer>,
    /// Each node's HTTP monitoring port (see [`NatsCluster::start_monitored`]).
    monitors: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` clustered nodes and waits until each accepts connections.
    /// JetStream elects its leader a moment later: retry the first KV calls.
    pub fn start(n: usize) -> NatsCluster {
        Self::start_with(n, false)
    }

    /// [`NatsCluster::start`], each node also serving its monitoring
    /// endpoints on a loopback port (what [`NatsCluster::meta_leader`] reads).
    pub fn start_monitored(n: usize) -> NatsCluster {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, monitored: bool) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitors: Vec<u16> =
            if monitored { (0..n).map(|_| free_port()).collect() } else { Vec::new() };
        let routes: Vec<String> =
            cluster_ports.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
        let nodes = (0..n)
            .map(|i| {
                let mut config = format!(
                    "server_name: n{i}\ncluster {{\n  name: orchestrix-test\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                    cluster_ports[i],
                    routes.join(", ")
                );
                if let Some(port) = monitors.get(i) {
                    config.push_str(&format!("http: \"127.0.0.1:{port}\"\n"));
                }
                NatsServer::start_with_config(&config)
            })
            .collect();
        NatsCluster { nodes, monitors }
    }

    /// The name (`n0`, …) of the node leading JetStream's meta group, as
    /// node `via` sees it (`/jsz`); `None` while there is none, or when the
    /// cluster was not started monitored.
    pub async fn meta_leader(&self, via: usize) -> Option<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let port = *self.monitors.get(via)?;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        conn.write_all(b"GET /jsz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.ok()?;
        let answer = String::from_utf8_lossy(&answer);
        let (_, body) = answer.split_once("\r\n\r\n")?;
        let jsz: serde_json::Value = serde_json::from_str(body).ok()?;
        jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()).map(str::to_owned)
    }

    /// Every node's URL, comma-separated (what `NatsOptions` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }
}

/// Handler calls, in order, across every worker of a test: what ran, where, how often.
#[derive(Clone, Default, Debug)]
pub struct Ledger(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Ledger {
    /// Records one line.
    pub fn log(&self, line: String) {
        self.lines_mut().push(line);
    }

    /// Every line, in order.
    pub fn lines(&self) -> Vec<String> {
        self.lines_mut().clone()
    }

    /// How many lines equal `line`.
    pub fn count(&self, line: &str) -> usize {
        self.lines_mut().iter().filter(|l| *l == line).count()
    }

    /// The lines that end with the run's id, in order.
    pub fn about(&self, run: orchestrix::RunId) -> Vec<String> {
        let run = run.to_string();
        self.lines_mut().iter().filter(|l| l.ends_with(&run)).cloned().collect()
    }

    /// How many lines start with `prefix`.
    pub fn starting(&self, prefix: &str) -> usize {
        self.lines_mut().iter().filter(|l| l.starts_with(prefix)).count()
    }

    fn lines_mut(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
