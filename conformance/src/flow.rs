//! The conformance flow: its contract (input, steps, policies, effects) and
//! the Rust reference implementation of it.
//!
//! Every worker under test serves this very flow, so every SDK must produce
//! the same definition, hence the same flow version hash.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orchestrix::prelude::*;
use serde::{Deserialize, Serialize};

/// The flow's name.
pub const FLOW: &str = "conformance";

/// The flow's steps, in order.
pub const STEPS: [&str; 5] = ["record", "flaky", "slow", "bounded", "decide"];

/// Retries of `flaky`.
pub const FLAKY_RETRIES: u32 = 3;

/// Delay between attempts of `flaky`.
pub const FLAKY_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Timeout of each attempt of `bounded`.
pub const BOUNDED_TIMEOUT: Duration = Duration::from_millis(1000);

/// What `decide` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Succeed.
    #[default]
    None,
    /// Fail for good: `declined: <id>`.
    Permanent,
    /// Fail with a retryable error (the step has no retries: the run fails).
    Retryable,
}

/// The run input of the conformance flow (camelCase keys on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConformanceInput {
    /// Free text, echoed in `decide`'s permanent error.
    pub id: String,
    /// `flaky` fails while its attempt number is at most this.
    pub flaky_failures: u32,
    /// How long `slow` sleeps (ms).
    pub slow_ms: u64,
    /// How long `bounded` sleeps (ms); its timeout is 1000 ms.
    pub bounded_ms: u64,
    /// What `decide` does.
    pub fail: FailMode,
}

/// An action or a compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectKind {
    /// The step's action.
    Execute,
    /// The step's compensation.
    Compensate,
}

/// What happened to a handler invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectEvent {
    /// The handler started (always written first).
    Start,
    /// The handler returned or threw.
    End,
    /// The handler was cancelled or timed out instead of returning.
    Stopped,
}

/// One line of the effects file (`$CONFORMANCE_EFFECTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Effect {
    /// The run (a UUID, any case).
    pub run_id: String,
    /// The step.
    pub step: String,
    /// Action or compensation.
    pub kind: EffectKind,
    /// The attempt number the handler was given (from 1).
    pub attempt: u32,
    /// Start, end or stopped.
    pub event: EffectEvent,
    /// `$CONFORMANCE_WORKER_NAME` of the worker that wrote it.
    pub worker: String,
    /// Unix ms when it was written.
    pub at_ms: u64,
}

/// Appends [`Effect`] lines to a file, one `write` per line.
#[derive(Debug, Clone)]
pub struct EffectLog {
    path: Option<PathBuf>,
    worker: Arc<str>,
}

impl EffectLog {
    /// A log into `path` (none: effects are not written), signed `worker`.
    pub fn new(path: Option<PathBuf>, worker: &str) -> Self {
        EffectLog { path, worker: Arc::from(worker) }
    }

    /// Appends one line; an I/O error is reported on stderr (the kit will
    /// then see the effect missing).
    pub fn write(
        &self,
        run_id: &str,
        step: &str,
        kind: EffectKind,
        attempt: u32,
        event: EffectEvent,
    ) {
        let Some(path) = &self.path else { return };
        let effect = Effect {
            run_id: run_id.to_owned(),
            step: step.to_owned(),
            kind,
            attempt,
            event,
            worker: self.worker.to_string(),
            at_ms: orchestrix_proto::time::unix_ms(std::time::SystemTime::now()),
        };
        let line = match serde_json::to_string(&effect) {
            Ok(mut l) => {
                l.push('\n');
                l
            }
            Err(e) => {
                eprintln!("conformance-worker: cannot encode an effect: {e}");
                return;
            }
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("conformance-worker: cannot append to {}: {e}", path.display());
        }
    }

    /// Writes `start` and returns the guard that writes `end` (when
    /// [`Invocation::end`] is called) or `stopped` (when it is dropped first:
    /// the handler's future was dropped at its timeout, or it gave up on a
    /// cancellation).
    pub fn start(&self, ctx: &StepContext<ConformanceInput>) -> Invocation {
        let kind = if ctx.is_compensation() { EffectKind::Compensate } else { EffectKind::Execute };
        let inv = Invocation {
            log: self.clone(),
            run_id: ctx.run_id().to_string(),
            step: ctx.step().to_owned(),
            kind,
            attempt: ctx.attempt(),
            finished: false,
        };
        inv.log.write(&inv.run_id, &inv.step, kind, inv.attempt, EffectEvent::Start);
        inv
    }
}

/// One handler invocation in progress (see [`EffectLog::start`]).
#[derive(Debug)]
pub struct Invocation {
    log: EffectLog,
    run_id: String,
    step: String,
    kind: EffectKind,
    attempt: u32,
    finished: bool,
}

impl Invocation {
    /// The handler returns (or fails) now: writes `end`.
    pub fn end(mut self) {
        self.finished = true;
        self.log.write(&self.run_id, &self.step, self.kind, self.attempt, EffectEvent::End);
    }
}

impl Drop for Invocation {
    fn drop(&mut self) {
        if !self.finished {
            self.log.write(&self.run_id, &self.step, self.kind, self.attempt, EffectEvent::Stopped);
        }
    }
}

/// Sleeps `ms`, or less when the context is cancelled. True when it slept
/// the whole time.
async fn sleep_unless_cancelled(ctx: &StepContext<ConformanceInput>, ms: u64) -> bool {
    let cancel = ctx.cancellation();
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => true,
        () = cancel.cancelled() => false,
    }
}

/// The conformance flow, served by the Rust reference worker, writing its
/// effects into `log`.
pub fn conformance_flow(log: EffectLog) -> Flow<ConformanceInput> {
    let (l1, l2, l3, l4, l5, l6, l7) =
        (log.clone(), log.clone(), log.clone(), log.clone(), log.clone(), log.clone(), log);
    create::<ConformanceInput>(FLOW)
        .step_with(
            "record",
            move |ctx| {
                let log = l1.clone();
                async move {
                    log.start(&ctx).end();
                    Ok(())
                }
            },
            move |o| {
                o.compensate(move |ctx| {
                    let log = l2.clone();
                    async move {
                        log.start(&ctx).end();
                        Ok(())
                    }
                })
            },
        )
        .step_with(
            "flaky",
            move |ctx| {
                let log = l3.clone();
                async move {
                    let inv = log.start(&ctx);
                    let attempt = ctx.attempt();
                    let result = if attempt <= ctx.input.flaky_failures {
                        Err(StepError::retryable(format!("flaky failure {attempt}")))
                    } else {
                        Ok(())
                    };
                    inv.end();
                    result
                }
            },
            move |o| {
                o.retries(FLAKY_RETRIES).retry_delay(FLAKY_RETRY_DELAY).compensate(move |ctx| {
                    let log = l4.clone();
                    async move {
                        log.start(&ctx).end();
                        Ok(())
                    }
                })
            },
        )
        .step("slow", move |ctx| {
            let log = l5.clone();
            async move {
                let inv = log.start(&ctx);
                if !sleep_unless_cancelled(&ctx, ctx.input.slow_ms).await {
                    drop(inv); // stopped
                    return Err(StepError::retryable("slow: cancelled"));
                }
                inv.end();
                Ok(())
            }
        })
        .step_with(
            "bounded",
            move |ctx| {
                let log = l6.clone();
                async move {
                    let inv = log.start(&ctx);
                    if !sleep_unless_cancelled(&ctx, ctx.input.bounded_ms).await {
                        drop(inv); // stopped
                        return Err(StepError::retryable("bounded: cancelled"));
                    }
                    inv.end();
                    Ok(())
                }
            },
            |o| o.timeout(BOUNDED_TIMEOUT),
        )
        .step("decide", move |ctx| {
            let log = l7.clone();
            async move {
                let inv = log.start(&ctx);
                let result = match ctx.input.fail {
                    FailMode::None => Ok(()),
                    FailMode::Permanent => {
                        Err(StepError::permanent(format!("declined: {}", ctx.input.id)))
                    }
                    FailMode::Retryable => {
                        Err(StepError::retryable(format!("retryable failure: {}", ctx.input.id)))
                    }
                };
                inv.end();
                result
            }
        })
}
