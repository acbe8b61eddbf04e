//! A worker process for the fault-injection harness (`chaos`): serves flow
//! `chaos`, steps `reserve`, `charge` and `notify`, each with a compensation,
//! and appends one line per handler call to a ledger file.
//!
//! ```sh
//! ledger_worker --nats nats://127.0.0.1:4222[,nats://...] --ledger /tmp/w0-0.ledger [--heartbeat-ms 200]
//! ```
//!
//! The input is `{ id: u64, fail: bool, delay_ms: u64 }`. Every handler sleeps
//! `delay_ms` (so that a kill hits it mid-step); `notify` fails permanently when
//! `fail` is true.
//!
//! Ledger lines, written when the handler *starts* (a side effect may happen
//! any time after that), with one `write` call on a file opened for appending:
//!
//! ```text
//! exec <run_id> <step> <attempt> <command_id> <worker_id>   an action that may have its effect
//! fail <run_id> <step> <attempt> <command_id> <worker_id>   an action that fails without any effect (notify, fail = true)
//! comp <run_id> <step> <attempt> <command_id> <worker_id>   a compensation
//! ```
//!
//! Prints `ready <worker id>` on stdout once it serves.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use orchestrix::{NatsOptions, StepContext, StepError, Worker};
use serde::{Deserialize, Serialize};

/// The `chaos` flow's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChaosInput {
    id: u64,
    fail: bool,
    delay_ms: u64,
}

#[derive(Parser)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long)]
    nats: String,
    /// The ledger file (appended to; created when missing).
    #[arg(long)]
    ledger: PathBuf,
    /// Heartbeat interval of the worker.
    #[arg(long, default_value_t = 200)]
    heartbeat_ms: u64,
}

/// The ledger: an append-only file, and who writes to it.
struct Ledger {
    file: File,
    /// The worker's id, known once it started.
    worker_id: OnceLock<String>,
    /// What stands for the worker id before it is known.
    fallback: String,
}

impl Ledger {
    /// Appends `<kind> <run_id> <step> <attempt> <command_id> <worker_id>`.
    fn record<I>(&self, kind: &str, ctx: &StepContext<I>) {
        let worker = self.worker_id.get().unwrap_or(&self.fallback);
        let line = format!(
            "{kind} {} {} {} {} {worker}\n",
            ctx.run_id(),
            ctx.step(),
            ctx.attempt(),
            ctx.command_id()
        );
        // One write(2) on an O_APPEND file: lines of concurrent handlers never
        // interleave. A short write would be a torn line: fail loudly.
        match (&self.file).write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(n) => panic!("short ledger write ({n} of {} bytes)", line.len()),
            Err(e) => panic!("cannot write the ledger: {e}"),
        }
        let _ = (&self.file).flush();
    }
}

async fn pause(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.ledger)
        .unwrap_or_else(|e| panic!("cannot open the ledger {}: {e}", args.ledger.display()));
    let ledger = Arc::new(Ledger {
        file,
        worker_id: OnceLock::new(),
        fallback: format!("pid-{}", std::process::id()),
    });
    let l = ledger.clone();
    let worker = Worker::builder()
        .nats(NatsOptions::new(args.nats))
        .heartbeat_interval(Duration::from_millis(args.heartbeat_ms))
        .steps::<ChaosInput>("chaos", move |mut f| {
            for step in ["reserve", "charge", "notify"] {
                let (a, c) = (l.clone(), l.clone());
                f = f
                    .step(step, move |ctx: StepContext<ChaosInput>| {
                        let ledger = a.clone();
                        async move {
                            // `notify` with `fail` refuses at once: no effect, ever.
                            let fails = ctx.step() == "notify" && ctx.input.fail;
                            ledger.record(if fails { "fail" } else { "exec" }, &ctx);
                            pause(ctx.input.delay_ms).await;
                            if fails {
                                let id = ctx.input.id;
                                return Err(StepError::permanent(format!("notify refused ({id})")));
                            }
                            Ok(())
                        }
                    })
                    .compensate(step, move |ctx| {
                        let ledger = c.clone();
                        async move {
                            ledger.record("comp", &ctx);
                            pause(ctx.input.delay_ms).await;
                            Ok(())
                        }
                    });
            }
            f
        })
        .start()
        .await
        .expect("worker starts");
    let _ = ledger.worker_id.set(worker.id().to_owned());
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {}", worker.id());
        let _ = out.flush();
    }
    worker.run_until_signal().await;
}
