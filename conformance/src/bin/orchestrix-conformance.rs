//! `orchestrix-conformance`: runs the conformance scenarios against a worker.
//!
//! ```sh
//! orchestrix-conformance --worker "node conformance/workers/typescript/dist/worker.js" --worker-name ts
//! ```
//!
//! Exit code 0 when every scenario passed, 1 when one failed, 2 when the kit
//! could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use orchestrix_conformance::kit::{self, KitConfig};
use orchestrix_conformance::procs::sibling;

/// Runs the conformance flow's scenarios against a worker under test, with
/// a real nats-server and `orchestrix serve` coordinators.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Shell command that starts the worker under test (it gets NATS_URL,
    /// ORCHESTRIX_PREFIX, CONFORMANCE_EFFECTS, CONFORMANCE_WORKER_NAME and
    /// prints a line starting with `ready` once it serves).
    #[arg(long)]
    worker: String,
    /// CONFORMANCE_WORKER_NAME of the worker under test.
    #[arg(long, default_value = "under-test")]
    worker_name: String,
    /// Print the results as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only these scenarios (numbers or names, comma-separated).
    #[arg(long)]
    only: Vec<String>,
    /// The `orchestrix` binary (default: next to this one).
    #[arg(long, env = "ORCHESTRIX_BIN")]
    orchestrix: Option<PathBuf>,
    /// The Rust reference worker, for the mixed-replicas scenario (default: next to this one).
    #[arg(long, env = "CONFORMANCE_REFERENCE_WORKER")]
    reference_worker: Option<PathBuf>,
    /// The nats-server binary.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server: PathBuf,
}

fn resolve(given: Option<PathBuf>, name: &str) -> PathBuf {
    given.or_else(|| sibling(name)).unwrap_or_else(|| PathBuf::from(name))
}

fn which(bin: PathBuf) -> PathBuf {
    if bin.components().count() > 1 {
        return bin;
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(&bin)).find(|p| p.is_file()))
        .unwrap_or(bin)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = KitConfig {
        worker_command: args.worker,
        worker_name: args.worker_name,
        orchestrix_bin: resolve(args.orchestrix, "orchestrix"),
        nats_server_bin: which(args.nats_server),
        reference_worker: resolve(args.reference_worker, "conformance-worker"),
        only: args.only,
    };
    // ctrl-c / SIGTERM: the kit's future is dropped, and with it every child.
    let result = tokio::select! {
        r = kit::run(&config) => r,
        () = signalled() => {
            eprintln!("interrupted: children killed");
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("error: cannot write JSON: {e}"),
                }
            } else {
                print!("{}", report.table());
            }
            if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn signalled() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
