//! Orchestrix benchmarks.
//!
//! `cargo run --release -p orchestrix-bench` prints a table; `-- --json` prints
//! one JSON object per scenario and concurrency. Later scenarios (NATS) print
//! their floor — the same work done with raw NATS on the same server — beside
//! them, measured in the same run.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

mod nats;
mod spans;
use hdrhistogram::Histogram;
use nats::worker_process;
use orchestrix::{Coordinator, RunOptions, RunStatus, create};
use serde::Serialize;

// The allocator the `orchestrix` binary ships with, so the figures are its own.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Orchestrix benchmarks")]
struct Args {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Only run scenarios whose name contains this (or one of these, comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Seconds each measurement runs (after a warm-up of a fifth of it).
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    seconds: f64,
    /// Runs parked at once for the memory measurement (1 to 10,000,000).
    #[arg(long, default_value_t = 100_000)]
    parked: usize,
    /// NATS server for the NATS scenarios (default: start one, from
    /// `NATS_SERVER_BIN` or `nats-server` on the PATH, on a free port).
    #[arg(long)]
    nats: Option<String>,
    /// Start the NATS server with `sync_interval: always` (fsync before every ack).
    #[arg(long)]
    sync_always: bool,
    /// Export spans and metrics (OTLP/HTTP) to a sink in this process, from
    /// the coordinator and the worker: scenario names get `-traced`.
    #[arg(long)]
    traced: bool,
    /// Which concurrency to measure: `low` (1), `high` (64 over NATS, 1,000
    /// in process) or both. One alone suits a profiler, whose per-run
    /// figures would otherwise mix the two.
    #[arg(long, value_enum, default_value_t = Load::Both)]
    concurrency: Load,
    /// Internal: OTLP/HTTP base URL the worker process exports to.
    #[arg(long, hide = true)]
    trace_to: Option<String>,
    /// Internal: serve the benchmark's steps and echo subject as a worker process.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

/// Which of a scenario's concurrencies are measured.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    Low,
    High,
    Both,
}

impl Args {
    /// The concurrencies to measure, of 1 and `high`.
    fn concurrencies(&self, high: usize) -> Vec<usize> {
        match self.concurrency {
            Load::Low => vec![1],
            Load::High => vec![high],
            Load::Both => vec![1, high],
        }
    }
}

/// One line of output.
#[derive(Serialize, Debug)]
struct Figure {
    scenario: &'static str,
    concurrency: usize,
    runs: u64,
    runs_per_s: f64,
    /// Latency, where it is measured (not for parked runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_per_run: Option<f64>,
    /// CPU time per run of this process and the ones it started (the NATS
    /// server, the worker process), over the measured interval: steadier
    /// than runs/s on a shared machine, where other tenants take turns on
    /// the cores (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_run: Option<f64>,
    /// The same, process by process: `bench` (this one: the coordinator in
    /// saga scenarios, the client in floors), `nats_server`, `worker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_run_by: Option<std::collections::BTreeMap<&'static str, f64>>,
}

impl Figure {
    /// A memory figure: `n` runs parked, started in `elapsed` seconds,
    /// holding `held` bytes of resident memory.
    fn parked(scenario: &'static str, n: usize, elapsed: f64, held: f64) -> Figure {
        Figure {
            scenario,
            concurrency: n,
            runs: n as u64,
            runs_per_s: n as f64 / elapsed,
            p50_us: None,
            p99_us: None,
            bytes_per_run: Some(held / n as f64),
            cpu_us_per_run: None,
            cpu_us_per_run_by: None,
        }
    }

    fn print(mut self, json: bool, traced: bool) {
        if traced {
            // The sampler from the standard variables, when one is set.
            let ratio = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
            let mut suffix = match (std::env::var("OTEL_TRACES_SAMPLER").ok(), ratio) {
                (Some(s), Some(r)) if s.ends_with("traceidratio") => format!("-traced-ratio{r}"),
                _ => "-traced".into(),
            };
            if std::env::var("OTEL_METRICS_EXPORTER").is_ok_and(|v| v == "none") {
                suffix.push_str("-spans-only");
            }
            self.scenario = Box::leak(format!("{}{suffix}", self.scenario).into_boxed_str());
        }
        if json {
            println!("{}", serde_json::to_string(&self).unwrap_or_default());
        } else {
            // A span floor counts spans, the rest runs.
            let unit = if self.scenario.starts_with("span-floor") { "span" } else { "run" };
            let mem = self.bytes_per_run.map(|b| format!("  {b:>8.0} B/run")).unwrap_or_default();
            let latency = match (self.p50_us, self.p99_us) {
                (Some(p50), Some(p99)) => format!("  p50 {p50:>8.1} µs  p99 {p99:>8.1} µs"),
                _ => String::new(),
            };
            let cpu = self
                .cpu_us_per_run
                .map(|c| format!("  cpu {c:>7.1} µs/{unit}"))
                .unwrap_or_default();
            let parts = match &self.cpu_us_per_run_by {
                Some(by) if by.len() > 1 => {
                    let by: Vec<String> = by.iter().map(|(p, c)| format!("{p} {c:.0}")).collect();
                    format!(" ({})", by.join(", "))
                }
                _ => String::new(),
            };
            let latency = latency + &cpu + &parts;
            println!(
                "{:<22} c={:<5} {:>10.0} {unit}s/s{latency}{mem}",
                self.scenario, self.concurrency, self.runs_per_s
            );
        }
    }
}

/// The processes this one started, whose CPU counts in `cpu_us_per_run`,
/// each with its part's name.
static STARTED: std::sync::Mutex<Vec<(u32, &'static str)>> = std::sync::Mutex::new(Vec::new());

/// Counts a started process's CPU in the figures, under `part`.
pub(crate) fn count_cpu_of(pid: u32, part: &'static str) {
    STARTED.lock().unwrap_or_else(|p| p.into_inner()).push((pid, part));
}

/// CPU seconds (user and system, every thread) used so far by this process
/// (`bench`) and the ones it started, part by part, from `/proc`; `None`
/// where there is no `/proc`.
fn cpu_seconds() -> Option<Vec<(&'static str, f64)>> {
    // Clock ticks of 1/100 s (`USER_HZ`, 100 on every Linux platform we run on).
    let sink = SINK.ticks.load(Ordering::Relaxed);
    let mut parts = vec![("bench", ticks("self")?.saturating_sub(sink) as f64 / 100.0)];
    if SINK.started.load(Ordering::Relaxed) {
        parts.push(("otlp_sink", sink as f64 / 100.0));
    }
    for (pid, part) in STARTED.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        parts.push((part, ticks(&pid.to_string()).unwrap_or(0) as f64 / 100.0));
    }
    Some(parts)
}

/// User and system CPU ticks of `/proc/{task}/stat` (`self`, `thread-self`,
/// a pid).
fn ticks(task: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{task}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// What the in-process OTLP sink has taken: bodies' bytes, and the CPU
/// ticks of its threads (each adds its own as it goes), which the figures
/// count apart from the bench's: a collector's work is not the cost of
/// tracing, though it runs on the same cores.
struct Sink {
    started: AtomicBool,
    bytes: AtomicU64,
    ticks: AtomicU64,
}

static SINK: Sink =
    Sink { started: AtomicBool::new(false), bytes: AtomicU64::new(0), ticks: AtomicU64::new(0) };

/// CPU µs per run, in all and part by part, between two readings.
fn cpu_per_run(
    before: Option<Vec<(&'static str, f64)>>,
    after: Option<Vec<(&'static str, f64)>>,
    runs: u64,
) -> (Option<f64>, Option<std::collections::BTreeMap<&'static str, f64>>) {
    let (Some(before), Some(after)) = (before, after) else { return (None, None) };
    if runs == 0 {
        return (None, None);
    }
    let mut by = std::collections::BTreeMap::new();
    for ((part, a), (_, b)) in before.iter().zip(&after) {
        *by.entry(*part).or_insert(0.0) += (b - a) * 1e6 / runs as f64;
    }
    (Some(by.values().sum()), Some(by))
}

/// Runs `one` from `concurrency` loops for `seconds` and measures each call.
async fn measure<F, Fut>(scenario: &'static str, concurrency: usize, seconds: f64, one: F) -> Figure
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    // Warm-up: threads started, caches and allocator pools filled.
    drive(concurrency, Duration::from_secs_f64(seconds / 5.0), one.clone()).await;
    let (started, cpu_before) = (Instant::now(), cpu_seconds());
    let hist = drive(concurrency, Duration::from_secs_f64(seconds), one).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu_us_per_run, cpu_us_per_run_by) = cpu_per_run(cpu_before, cpu_seconds(), hist.len());
    Figure {
        scenario,
        concurrency,
        runs: hist.len(),
        runs_per_s: hist.len() as f64 / elapsed,
        p50_us: Some(hist.value_at_quantile(0.50) as f64 / 1000.0),
        p99_us: Some(hist.value_at_quantile(0.99) as f64 / 1000.0),
        bytes_per_run: None,
        cpu_us_per_run,
        cpu_us_per_run_by,
    }
}

async fn drive<F, Fut>(concurrency: usize, span: Duration, one: Arc<F>) -> Histogram<u64>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let deadline = Instant::now() + span;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let one = one.clone();
            let driver = async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                while Instant::now() < deadline {
                    let t = Instant::now();
                    one().await;
                    let _ = h.record(t.elapsed().as_nanos() as u64);
                }
                h
            };
            // On a node's actix system (the `-1t` scenarios) the drivers
            // stay on its thread, as the handlers of a service embedding
            // the node would.
            if actix_rt::Arbiter::try_current().is_some() {
                actix_rt::spawn(driver)
            } else {
                tokio::spawn(driver)
            }
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = all.add(h);
        }
    }
    all
}

fn noop_flow() -> orchestrix::Flow<u64> {
    create::<u64>("bench")
        .step("one", |_| async { Ok(()) })
        .step("two", |_| async { Ok(()) })
        .step("three", |_| async { Ok(()) })
}

/// The same three steps, the last two in a parallel group.
fn noop_parallel_flow() -> orchestrix::Flow<u64> {
    create::<u64>("bench-par").step("one", |_| async { Ok(()) }).parallel("fan", |g| {
        g.step("two", |_| async { Ok(()) }).step("three", |_| async { Ok(()) })
    })
}

async fn saga_inprocess(args: &Args, wanted: &impl Fn(&str) -> bool) -> Vec<Figure> {
    // Memory first, in a fresh process: pages left resident by the throughput
    // runs would otherwise be reused and hide what parked runs cost.
    let mut out = Vec::new();
    if wanted("saga-inprocess-parked") {
        out.push(parked_memory(args.parked).await);
    }
    for concurrency in args.concurrencies(1000) {
        let flows =
            [("saga-inprocess", noop_flow()), ("saga-inprocess-parallel", noop_parallel_flow())];
        for (scenario, flow) in flows {
            if !wanted(scenario) {
                continue;
            }
            let name = flow.definition().name.clone();
            let coordinator = Coordinator::builder().flow(&flow).build().expect("flow");
            let figure = measure(scenario, concurrency, args.seconds, move || {
                let (c, name) = (coordinator.clone(), name.clone());
                async move {
                    let report = c.run(&name, &1u64, RunOptions::new()).await.expect("run");
                    assert_eq!(report.status, RunStatus::Completed);
                }
            })
            .await;
            out.push(figure);
        }
    }
    out
}

/// Heap held per run in flight: `n` runs parked on a step that never ends.
async fn parked_memory(n: usize) -> Figure {
    let entered = Arc::new(AtomicUsize::new(0));
    let e = entered.clone();
    let flow = create::<u64>("parked")
        .step("one", |_| async { Ok(()) })
        .step("wait", move |_| {
            e.fetch_add(1, Ordering::Relaxed);
            async {
                futures::future::pending::<()>().await;
                Ok(())
            }
        })
        .step("three", |_| async { Ok(()) });
    let coordinator = Coordinator::builder().flow(&flow).build().expect("flow");
    // Warm the engine so its threads and pools are not counted.
    let warm = coordinator.start("parked", &0u64, RunOptions::new()).await.expect("start");
    drop(warm);
    while entered.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    let rss_before = resident_bytes();
    let started = Instant::now();
    for i in 0..n {
        // The caller's handle is dropped: only what the engine holds is measured.
        drop(coordinator.start("parked", &(i as u64), RunOptions::new()).await.expect("start"));
    }
    while entered.load(Ordering::Relaxed) < n + 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let held = resident_bytes().saturating_sub(rss_before) as f64;
    Figure::parked("saga-inprocess-parked", n, elapsed, held)
}

/// A local OTLP/HTTP endpoint that accepts and discards everything, so the
/// traced scenarios pay for producing and sending spans, not for a
/// collector; its CPU is counted apart ([`Sink`]).
fn otlp_sink() -> String {
    use std::io::BufReader;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("sink port");
    let url = format!("http://{}", listener.local_addr().expect("sink address"));
    SINK.started.store(true, Ordering::Relaxed);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut seen = ticks("thread-self").unwrap_or(0);
                let mut count = || {
                    let now = ticks("thread-self").unwrap_or(seen);
                    SINK.ticks.fetch_add(now.saturating_sub(seen), Ordering::Relaxed);
                    seen = now;
                };
                let mut reader = BufReader::new(stream);
                while take_request(&mut reader) {
                    count();
                }
                count();
            });
        }
    });
    url
}

/// Reads one request on a sink's connection, counts its body's bytes and
/// answers 200; `false` when the connection ends.
fn take_request(reader: &mut std::io::BufReader<std::net::TcpStream>) -> bool {
    use std::io::{BufRead, Read, Write};
    let (mut len, mut line) = (0usize, String::new());
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    // Read through and dropped, never held.
    let mut body = reader.by_ref().take(len as u64);
    if std::io::copy(&mut body, &mut std::io::sink()).ok() != Some(len as u64) {
        return false;
    }
    SINK.bytes.fetch_add(len as u64, Ordering::Relaxed);
    let ok =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
    reader.get_mut().write_all(ok).is_ok()
}

/// Spans and metrics to the sink at `url`; spans only when
/// `OTEL_METRICS_EXPORTER=none` (the standard variable), so that the cost of
/// tracing can be told from the cost of metrics.
pub(crate) fn export(url: &str) -> orchestrix::telemetry::Export {
    let export = orchestrix::telemetry::Export::http(url);
    if std::env::var("OTEL_METRICS_EXPORTER").is_ok_and(|v| v == "none") {
        export.without_metrics()
    } else {
        export
    }
}

/// Resident memory of this process (Linux: `/proc/self/statm`), 0 elsewhere.
/// Resident rather than allocated bytes: what the machine actually gives up,
/// allocator overhead included, and no instrumented allocator slowing the
/// throughput figures down.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    let args = Args::parse();
    if let Some(url) = &args.worker {
        worker_process(url, args.trace_to.as_deref());
        return;
    }
    if let Some(why) = bad_arguments(&args) {
        eprintln!("error: {why}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        let sink = args.traced.then(otlp_sink);
        let telemetry = sink.as_ref().map(|url| {
            Arc::new(orchestrix::telemetry::init_with(
                "orchestrix-bench",
                "warn",
                Some(export(url)),
            ))
        });
        let args = Args { trace_to: sink, ..args };
        let wanted = |name: &str| {
            args.only.as_deref().is_none_or(|o| o.split(',').any(|o| name.contains(o)))
        };
        if !args.json {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            println!("orchestrix-bench: {cores} cores, {} s per measurement", args.seconds);
        }
        if INPROCESS_SCENARIOS.iter().any(|n| wanted(n)) {
            for f in saga_inprocess(&args, &wanted).await {
                f.print(args.json, args.traced);
            }
        }
        // Only traced: they measure the installed telemetry.
        if let Some(guard) = &telemetry {
            match spans::floors(args.seconds, guard, &wanted).await {
                Ok(figures) => figures.into_iter().for_each(|f| f.print(args.json, false)),
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
        }
        if nats::SCENARIOS.iter().chain(&nats::DURABLE_SCENARIOS).any(|n| wanted(n)) {
            match nats::run(&args, &wanted).await {
                Ok(figures) => {
                    for f in figures {
                        f.print(args.json, args.traced);
                    }
                }
                Err(e) => {
                    // Said, and in the exit code: a script must not take
                    // a run that measured nothing for a result.
                    eprintln!("error: NATS scenarios skipped: {e}");
                    return 1;
                }
            }
        }
        0
    });
    std::process::exit(code);
}

const INPROCESS_SCENARIOS: [&str; 3] =
    ["saga-inprocess", "saga-inprocess-parallel", "saga-inprocess-parked"];

/// What makes the arguments meaningless, if anything: no time to measure
/// in, or an `--only` that names no scenario.
fn bad_arguments(args: &Args) -> Option<String> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Some(format!("--seconds must be a positive number, not {}", args.seconds));
    }
    // Each parked run holds about 2 KiB: past ten million, the machine's
    // memory runs out before the figure is made.
    if !(1..=10_000_000).contains(&args.parked) {
        return Some(format!("--parked must be 1 to 10,000,000 runs, not {}", args.parked));
    }
    let only = args.only.as_deref()?;
    let names = |list: &[&str]| list.iter().any(|n| only.split(',').any(|o| n.contains(o)));
    if !args.traced
        && names(&spans::SCENARIOS)
        && !names(&INPROCESS_SCENARIOS)
        && !names(&nats::SCENARIOS)
        && !names(&nats::DURABLE_SCENARIOS)
    {
        return Some(format!("--only {only} names only span floors, which measure --traced"));
    }
    let all = INPROCESS_SCENARIOS
        .iter()
        .chain(&spans::SCENARIOS)
        .chain(&nats::SCENARIOS)
        .chain(&nats::DURABLE_SCENARIOS);
    if all.clone().any(|n| only.split(',').any(|o| n.contains(o))) {
        return None;
    }
    let names: Vec<&str> = all.copied().collect();
    Some(format!("--only {only} names no scenario (they are: {})", names.join(", ")))
}
