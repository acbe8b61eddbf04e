//! Child processes of the kit: `nats-server`, coordinators, workers.
//!
//! The same approach as `orchestrix-integration-tests` (free loopback ports,
//! JetStream in a temp dir, output collected line by line), with typed
//! errors rather than panics, and every child in its own process group,
//! killed (group and all) when its handle is dropped: a worker started
//! through `sh -c` does not outlive the kit.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::KitError;

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16, KitError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| KitError::Io { what: "finding a free port".into(), source: e })
}

type Lines = Arc<Mutex<Vec<String>>>;

fn lock(lines: &Lines) -> std::sync::MutexGuard<'_, Vec<String>> {
    lines.lock().unwrap_or_else(|p| p.into_inner())
}

fn collect(out: impl AsyncRead + Unpin + Send + 'static) -> Lines {
    let lines = Lines::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(out).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lock(&sink).push(line);
        }
    });
    lines
}

/// A child process in its own process group, with its stdout and stderr
/// lines collected; killed with its whole group when dropped.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: tokio::process::Child,
    pid: Option<u32>,
    stdout: Lines,
    stderr: Lines,
}

impl Child {
    /// Starts `program` with `args` and extra `env`, named `name` in errors.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Child, KitError> {
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| KitError::Spawn {
            what: format!("{name} ({})", program.display()),
            source: e,
        })?;
        let pid = child.id();
        let stdout = child.stdout.take().map(collect).unwrap_or_default();
        let stderr = child.stderr.take().map(collect).unwrap_or_default();
        Ok(Child { name: name.to_owned(), child, pid, stdout, stderr })
    }

    /// Starts a shell command line (`sh -c`).
    pub fn spawn_shell(name: &str, line: &str, env: &[(&str, String)]) -> Result<Child, KitError> {
        Child::spawn(name, Path::new("/bin/sh"), &["-c".to_owned(), line.to_owned()], env)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        lock(&self.stdout).clone()
    }

    /// Stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        lock(&self.stderr).clone()
    }

    /// The last `n` lines of stderr, for error messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = lock(&self.stderr);
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until a line of stdout (or of stderr, with `in_stderr`)
    /// contains `needle`; fails if the process exits or `within` passes.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        in_stderr: bool,
        within: Duration,
    ) -> Result<String, KitError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let lines = if in_stderr { self.stderr() } else { self.stdout() };
            if let Some(l) = lines.into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            let why = if !self.is_running() {
                Some("it exited")
            } else if tokio::time::Instant::now() >= deadline {
                Some("timed out")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(KitError::NotReady {
                    what: self.name.clone(),
                    detail: format!(
                        "no line with {needle:?} ({why} after {within:?}); stdout: {:?}; stderr (tail): {}",
                        self.stdout(),
                        self.stderr_tail(15)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGKILL to its process group and reaps it.
    pub async fn kill(&mut self) {
        self.kill_group();
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    fn kill_group(&mut self) {
        if let Some(pid) = self.pid.take() {
            // `kill(1)`: no `unsafe` for a signal to a process group.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

/// A `nats-server` with JetStream on a free loopback port, its store in a
/// temp dir removed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `bin` and waits (up to 10 s) until it accepts connections.
    pub async fn start(bin: &Path) -> Result<NatsServer, KitError> {
        let dir = tempfile::tempdir()
            .map_err(|e| KitError::Io { what: "creating a temp dir".into(), source: e })?;
        let port = free_port()?;
        let args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().display().to_string(),
        ];
        let mut child =
            Child::spawn("nats-server (set NATS_SERVER_BIN or --nats-server)", bin, &args, &[])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if !child.is_running() || tokio::time::Instant::now() >= deadline {
                return Err(KitError::NotReady {
                    what: format!("nats-server ({})", bin.display()),
                    detail: format!(
                        "did not listen on 127.0.0.1:{port}: {}",
                        child.stderr_tail(10)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(NatsServer { child, port, _dir: dir })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server.
    pub async fn kill(&mut self) {
        self.child.kill().await;
    }
}

/// `name` next to the running executable, if it is there.
pub fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)].into_iter().find(|p| p.is_file())
}
