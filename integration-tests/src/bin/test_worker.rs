//! A worker process for fault tests: serves flow `crash` (steps `a` and `b`,
//! both with a compensation; `b` takes `--delay-ms`), printing one line per
//! handler call to stdout so the test can count executions across processes.
//! `--exit-in-b` makes it exit inside `b`'s handler, as it starts.
//!
//! Installs no log subscriber of its own unless `--own-subscriber` (which
//! logs to stdout): the worker's fallback logging is under test, and
//! `--no-default-logging` turns it off.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use orchestrix::{NatsOptions, StepContext, Worker};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    nats: String,
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// `WorkerBuilder::default_logging(false)`.
    #[arg(long)]
    no_default_logging: bool,
    /// Install a subscriber of the service's own first: logs to stdout.
    #[arg(long)]
    own_subscriber: bool,
    /// The process exits inside `b`'s handler, right after it printed
    /// `b-start`, before the handler first awaits: a crash as a side
    /// effect begins.
    #[arg(long)]
    exit_in_b: bool,
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let exit_in_b = args.exit_in_b;
    if args.own_subscriber {
        tracing_subscriber::fmt().with_writer(std::io::stdout).with_ansi(false).init();
    }
    let worker = Worker::builder()
        .default_logging(!args.no_default_logging)
        .nats(NatsOptions::new(args.nats))
        .heartbeat_interval(Duration::from_millis(args.heartbeat_ms))
        .steps::<u32>("crash", |f| {
            f.step("a", |ctx: StepContext<u32>| async move {
                say(format!("a {} {}", ctx.run_id(), ctx.attempt()));
                Ok(())
            })
            .compensate("a", |ctx| async move {
                say(format!("undo-a {} {}", ctx.run_id(), ctx.attempt()));
                Ok(())
            })
            .compensate("b", |ctx| async move {
                say(format!("undo-b {} {}", ctx.run_id(), ctx.attempt()));
                Ok(())
            })
            .step("b", move |ctx| async move {
                say(format!("b-start {} {}", ctx.run_id(), ctx.attempt()));
                if exit_in_b {
                    std::process::exit(70);
                }
                tokio::time::sleep(delay).await;
                say(format!("b-done {} {}", ctx.run_id(), ctx.attempt()));
                Ok(ctx.input)
            })
        })
        .start()
        .await
        .expect("worker starts");
    say(format!("subscriber set: {}", tracing::dispatcher::has_been_set()));
    say(format!("ready {}", worker.id()));
    worker.run_until_signal().await;
    say("drained".into());
}
