//! The scenarios. Each returns `Err(reason)` at the first check that does
//! not hold; none sleeps to synchronise (each waits for a condition, with a
//! bound).

use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrix::{ClientError, Rejection, RunId, RunOptions, RunReport, RunStatus, StepStatus};
use orchestrix_proto::{
    Ack, Acks, CommandKind, Heartbeat, Message, PROTOCOL_VERSION, Payload, StepCommand,
    StepOutcome, StepReport, WireError,
};
use uuid::Uuid;

use crate::effects::{self, Effects};
use crate::flow::{
    BOUNDED_TIMEOUT, ConformanceInput, EffectEvent::*, EffectKind::*, FLAKY_RETRY_DELAY, FLOW,
    FailMode, STEPS,
};
use crate::kit::{Env, Envs};

type Outcome = Result<(), String>;

/// Fails the scenario with the message unless the condition holds.
macro_rules! check {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// Runs scenario `number`.
pub(crate) async fn run(number: u32, envs: &Envs) -> Outcome {
    fn need(env: &Option<std::sync::Arc<Env>>) -> Result<&Env, String> {
        env.as_deref().ok_or_else(|| "its environment was not set up".to_owned())
    }
    match number {
        1 => success(need(&envs.a)?).await,
        2 => retries(need(&envs.a)?).await,
        3 => permanent_error(need(&envs.a)?).await,
        4 => heartbeats(need(&envs.a)?).await,
        5 => step_timeout(need(&envs.a)?).await,
        6 => deadline_refusal(need(&envs.a)?).await,
        7 => malformed_input(need(&envs.a)?).await,
        8 => cancel(need(&envs.a)?).await,
        9 => coordinator_kill(need(&envs.b)?).await,
        10 => mixed_replicas(need(&envs.c)?).await,
        11 => no_handler(need(&envs.a)?).await,
        n => Err(format!("no scenario {n}")),
    }
}

/// A fresh input: nothing fails, nothing waits.
fn input(tag: &str) -> ConformanceInput {
    let id = Uuid::new_v4().simple().to_string();
    ConformanceInput { id: format!("{tag}-{}", &id[..12]), ..ConformanceInput::default() }
}

/// Starts a run (with the input's id as its idempotency key, so a start
/// retried while the coordinator learns the flow is safe).
async fn start(env: &Env, input: &ConformanceInput) -> Result<RunId, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let options = RunOptions::new().key(format!("conformance:{}", input.id));
        match env.client.start(FLOW, input, options).await {
            Ok(id) => return Ok(id),
            Err(e) => {
                let again =
                    matches!(e, ClientError::NoCoordinator { .. } | ClientError::Unavailable(_))
                        || matches!(
                            e.rejection(),
                            Some(Rejection::UnknownFlow | Rejection::UnknownVersion)
                        );
                if !again || tokio::time::Instant::now() >= deadline {
                    return Err(format!("cannot start a run of `{FLOW}`: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Waits for the final report of `run`.
async fn finish(env: &Env, run: RunId, within: Duration) -> Result<RunReport, String> {
    // Each wait is bounded at 5 s and followed by a plain status request: a
    // wait request that reached a coordinator just as it was killed
    // (scenario 9) is never answered, and must not cost the scenario.
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left.min(Duration::from_secs(5)), env.client.wait(run)).await {
            Ok(Ok(report)) => return Ok(report),
            Ok(Err(e)) => return Err(format!("cannot get the report of run {run}: {e}")),
            Err(_) => {
                let now = env.client.status(run).await;
                if let Ok(report) = &now
                    && report.status.is_terminal()
                {
                    return now.map_err(|e| e.to_string());
                }
                if tokio::time::Instant::now() >= deadline {
                    let so_far = now.map(|r| one_line(&r)).unwrap_or_else(|e| e.to_string());
                    return Err(format!(
                        "run {run} did not finish within {within:?}; so far: {so_far}"
                    ));
                }
            }
        }
    }
}

/// Runs `input` to its end.
async fn run_to_end(
    env: &Env,
    input: &ConformanceInput,
    within: Duration,
) -> Result<(RunId, RunReport), String> {
    let run = start(env, input).await?;
    Ok((run, finish(env, run, within).await?))
}

/// A report in one line, for failure messages.
fn one_line(r: &RunReport) -> String {
    let steps: Vec<String> = r
        .steps
        .iter()
        .map(|s| {
            let mut t = format!("{} {:?}x{}", s.name, s.status, s.attempts);
            if let Some(e) = &s.error {
                t.push_str(&format!(" ({e})"));
            }
            if let Some(c) = &s.compensation {
                t.push_str(&format!(" comp x{}", c.attempts));
            }
            t
        })
        .collect();
    format!("{:?}: [{}]", r.status, steps.join("; "))
}

fn step<'a>(r: &'a RunReport, name: &str) -> Result<&'a StepReport, String> {
    r.step(name).ok_or_else(|| format!("the report has no step `{name}`: {}", one_line(r)))
}

/// The run ended in `status`.
fn ended_as(report: &RunReport, status: RunStatus) -> Result<(), String> {
    check!(
        report.status == status,
        "run status {:?}, expected {}: {}",
        report.status,
        status.as_str(),
        one_line(report)
    );
    Ok(())
}

/// Each of `steps` ended compensated in the report.
fn compensated(report: &RunReport, steps: &[&str]) -> Result<(), String> {
    for s in steps {
        let r = step(report, s)?;
        check!(
            r.status == StepStatus::Compensated,
            "`{s}`: {:?}, expected compensated: {}",
            r.status,
            one_line(report)
        );
    }
    Ok(())
}

/// The run's effects once `done` holds (bounded at 5 s; the last reading otherwise).
async fn effects_when(env: &Env, run: RunId, done: impl FnMut(&Effects) -> bool) -> Effects {
    effects::wait_for(&env.effects, run.as_uuid(), Duration::from_secs(5), done).await
}

/// Checks each step's action started exactly once and ended (never
/// stopped), and that every invocation's lines are well formed.
fn each_step_once(fx: &Effects, steps: &[&str]) -> Outcome {
    well_formed(fx)?;
    for s in steps {
        let (starts, ends) = (fx.count(s, Execute, Start), fx.count(s, Execute, End));
        check!(
            starts == 1 && ends == 1,
            "step `{s}`: {starts} start(s) and {ends} end(s) of its action, expected 1 and 1; effects: {}",
            fx.summary()
        );
    }
    Ok(())
}

/// Every action started and ended (the run's effects are complete).
fn all_ended(fx: &Effects) -> bool {
    STEPS.iter().all(|s| fx.count(s, Execute, End) >= 1)
}

/// When the first line of `step`'s `kind` with `event` was written.
fn at(
    fx: &Effects,
    step: &str,
    kind: crate::flow::EffectKind,
    event: crate::flow::EffectEvent,
) -> Result<u64, String> {
    fx.of(step, kind, event)
        .first()
        .map(|e| e.at_ms)
        .ok_or_else(|| format!("no {kind:?} {event:?} line for `{step}`: {}", fx.summary()))
}

/// Every invocation (worker, step, kind, attempt) wrote `start` first,
/// then exactly one of `end` or `stopped`, and nothing else.
fn well_formed(fx: &Effects) -> Outcome {
    let mut seen: std::collections::BTreeMap<
        (&str, &str, bool, u32),
        Vec<crate::flow::EffectEvent>,
    > = std::collections::BTreeMap::new();
    for e in &fx.0 {
        let key = (e.worker.as_str(), e.step.as_str(), e.kind == Compensate, e.attempt);
        seen.entry(key).or_default().push(e.event);
    }
    for ((worker, step, comp, attempt), events) in seen {
        check!(
            events == [Start, End] || events == [Start, Stopped],
            "{} #{attempt} of `{step}` (worker {worker}) wrote {events:?}, expected [Start, End] or [Start, Stopped]: {}",
            if comp { "compensation" } else { "action" },
            fx.summary()
        );
    }
    Ok(())
}

fn no_compensation(fx: &Effects) -> Outcome {
    let comps: Vec<_> = fx.0.iter().filter(|e| e.kind == Compensate).collect();
    check!(comps.is_empty(), "compensations ran in a run that completed: {}", fx.summary());
    Ok(())
}

/// A message seen passively on the wire, in the order the kit's
/// subscription got it (one subscription: one order, the server's).
#[derive(Debug, Clone)]
struct Seen {
    /// The subject it was published on.
    subject: String,
    /// Its reply subject (a command's: where the worker must answer).
    reply: Option<String>,
    /// Its `kind`.
    kind: String,
    /// The command it is about.
    command_id: Uuid,
    /// A command's run and step.
    command: Option<(Uuid, String)>,
    /// When it reached the kit (kit clock).
    at: Instant,
    /// When it reached the kit, Unix ms.
    at_ms: u64,
}

/// A passive subscription (no queue group: the kit only watches) whose
/// messages are timestamped as they arrive, by a task of its own.
struct Watch {
    seen: std::sync::Arc<std::sync::Mutex<(Vec<Seen>, Instant)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// What it got so far, once it has been quiet for 200 ms since it was
    /// asked (at most 1 s): what was already on its way is in.
    async fn drain(&self) -> Vec<Seen> {
        let asked = Instant::now();
        let until = asked + Duration::from_secs(1);
        loop {
            let quiet = {
                let g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                g.1.max(asked).elapsed() >= Duration::from_millis(200)
            };
            if quiet || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }
}

/// A command id a message is about and, for the command itself, its run and step.
type About = (Uuid, Option<(Uuid, String)>);

/// What a message of kind `M` is about, or nothing if it does not decode.
fn about<M: Message>(payload: &[u8], f: impl FnOnce(M) -> Vec<About>) -> Vec<About> {
    orchestrix_proto::decode::<M>(payload).map(f).unwrap_or_default()
}

/// Watches `subject`: the commands, acks, heartbeats and outcomes on it,
/// each with the time it arrived; anything else is left out.
async fn watch(env: &Env, subject: String) -> Result<Watch, String> {
    let mut sub =
        env.nats.subscribe(subject).await.map_err(|e| format!("cannot subscribe: {e}"))?;
    env.nats.flush().await.map_err(|e| format!("cannot flush: {e}"))?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), Instant::now())));
    let into = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let (at, at_ms) =
                (Instant::now(), orchestrix_proto::time::unix_ms(std::time::SystemTime::now()));
            let Ok((_, kind)) = orchestrix_proto::peek_kind(&msg.payload) else { continue };
            // A `step.acks` counts as a `step.ack` for each of its commands.
            let p = &msg.payload;
            let (kind, ids): (String, Vec<About>) = match kind.as_str() {
                StepCommand::KIND => (
                    kind,
                    about(p, |c: StepCommand| {
                        vec![(c.command_id, Some((c.run_id, c.step.to_string())))]
                    }),
                ),
                Ack::KIND => (kind, about(p, |a: Ack| vec![(a.command_id, None)])),
                Acks::KIND => (
                    Ack::KIND.to_owned(),
                    about(p, |a: Acks| a.commands.iter().map(|c| (c.command_id, None)).collect()),
                ),
                Heartbeat::KIND => (kind, about(p, |h: Heartbeat| vec![(h.command_id, None)])),
                StepOutcome::KIND => (kind, about(p, |o: StepOutcome| vec![(o.command_id, None)])),
                _ => (kind, Vec::new()),
            };
            let mut g = into.lock().unwrap_or_else(|p| p.into_inner());
            g.1 = at;
            for (command_id, command) in ids {
                g.0.push(Seen {
                    subject: msg.subject.to_string(),
                    reply: msg.reply.as_ref().map(|r| r.to_string()),
                    kind: kind.clone(),
                    command_id,
                    command,
                    at,
                    at_ms,
                });
            }
        }
    });
    Ok(Watch { seen, task })
}

/// The commands of `run` among `seen` (first delivery of each command id,
/// in order): command id and step.
fn commands_of(seen: &[Seen], run: RunId) -> Vec<(Uuid, String)> {
    let mut out: Vec<(Uuid, String)> = Vec::new();
    for s in seen {
        if let Some((r, step)) = &s.command
            && *r == run.as_uuid()
            && !out.iter().any(|(id, _)| *id == s.command_id)
        {
            out.push((s.command_id, step.clone()));
        }
    }
    out
}

/// Protocol §5.1 step 5: every command got a `step.ack` before anything
/// else the worker sent about it (its heartbeats, its `step.outcome`), in
/// the order seen on the reply subjects.
fn acked_first(replies: &[Seen], commands: &[(Uuid, String)]) -> Outcome {
    for (id, step) in commands {
        let mine: Vec<&str> =
            replies.iter().filter(|r| r.command_id == *id).map(|r| r.kind.as_str()).collect();
        check!(
            mine.contains(&StepOutcome::KIND),
            "no `step.outcome` for `{step}`'s command {id} seen on the reply subjects (saw {mine:?})"
        );
        check!(
            mine.first() == Some(&Ack::KIND),
            "`{step}`'s command {id}: the worker sent {mine:?} on the reply subject, expected a `step.ack` first (protocol §5.1: ack, then run)"
        );
    }
    Ok(())
}

/// Scenario 1: All five steps complete in one attempt each, in order.
async fn success(env: &Env) -> Outcome {
    let p = env.subjects.prefix().to_owned();
    let commands = watch(env, format!("{p}.step.{FLOW}.>")).await?;
    let replies = watch(env, format!("{p}.reply.>")).await?;
    let (run, report) = run_to_end(env, &input("success"), Duration::from_secs(20)).await?;
    ended_as(&report, RunStatus::Completed)?;
    let names: Vec<&str> = report.steps.iter().map(|s| s.name.as_str()).collect();
    check!(names == STEPS, "steps {names:?}, expected {STEPS:?}");
    for s in &report.steps {
        check!(
            s.status == StepStatus::Completed && s.attempts == 1,
            "step `{}`: {:?} after {} attempt(s), expected completed after 1: {}",
            s.name,
            s.status,
            s.attempts,
            one_line(&report)
        );
    }
    let fx = effects_when(env, run, all_ended).await;
    each_step_once(&fx, &STEPS)?;
    no_compensation(&fx)?;
    let name = env.worker_names.first().map(String::as_str).unwrap_or_default();
    let others: Vec<&str> = fx.0.iter().map(|e| e.worker.as_str()).filter(|w| *w != name).collect();
    check!(
        others.is_empty(),
        "effects signed {others:?}, expected `{name}` ($CONFORMANCE_WORKER_NAME)"
    );
    // In flow order: each step starts once the one before it ended.
    for pair in STEPS.windows(2) {
        let ended = at(&fx, pair[0], Execute, End)?;
        let started = at(&fx, pair[1], Execute, Start)?;
        check!(
            started >= ended,
            "`{}` started before `{}` ended: {}",
            pair[1],
            pair[0],
            fx.summary()
        );
    }
    // On the wire: each of the 5 commands acked before anything else about it.
    let commands = commands_of(&commands.drain().await, run);
    let steps: Vec<&str> = commands.iter().map(|(_, s)| s.as_str()).collect();
    check!(steps == STEPS, "commands seen on the step subjects for {steps:?}, expected {STEPS:?}");
    acked_first(&replies.drain().await, &commands)
}

/// Scenario 2: `flaky` fails twice, then succeeds, its attempts at least the retry delay apart.
async fn retries(env: &Env) -> Outcome {
    let mut i = input("retries");
    i.flaky_failures = 2;
    let (run, report) = run_to_end(env, &i, Duration::from_secs(20)).await?;
    ended_as(&report, RunStatus::Completed)?;
    let flaky = step(&report, "flaky")?;
    check!(
        flaky.status == StepStatus::Completed && flaky.attempts == 3,
        "flaky: {:?} after {} attempts, expected completed after 3",
        flaky.status,
        flaky.attempts
    );
    let fx = effects_when(env, run, all_ended).await;
    let starts = fx.of("flaky", Execute, Start);
    let attempts: Vec<u32> = starts.iter().map(|e| e.attempt).collect();
    check!(
        attempts == [1, 2, 3],
        "flaky's attempts started: {attempts:?}, expected [1, 2, 3]; effects: {}",
        fx.summary()
    );
    let delay = u64::try_from(FLAKY_RETRY_DELAY.as_millis()).unwrap_or(u64::MAX);
    for pair in starts.windows(2) {
        let gap = pair[1].at_ms.saturating_sub(pair[0].at_ms);
        check!(
            gap >= delay,
            "attempts {} and {} of flaky started {gap} ms apart, expected >= {delay} ms",
            pair[0].attempt,
            pair[1].attempt
        );
    }
    each_step_once(&fx, &["record", "slow", "bounded", "decide"])?;
    no_compensation(&fx)
}

/// Scenario 3: `decide` declines for good: the completed compensable steps are
/// compensated in reverse order, once each.
async fn permanent_error(env: &Env) -> Outcome {
    let mut i = input("permanent");
    i.fail = FailMode::Permanent;
    let (run, report) = run_to_end(env, &i, Duration::from_secs(20)).await?;
    ended_as(&report, RunStatus::Failed)?;
    let decide = step(&report, "decide")?;
    let want = format!("declined: {}", i.id);
    check!(
        decide.status == StepStatus::Failed && decide.attempts == 1,
        "decide: {:?} after {} attempt(s), expected failed after 1",
        decide.status,
        decide.attempts
    );
    check!(
        decide.error.as_deref().is_some_and(|e| e.contains(&want)),
        "decide's error {:?}, expected it to say {want:?}",
        decide.error
    );
    compensated(&report, &["record", "flaky"])?;
    let fx = effects_when(env, run, |fx| {
        fx.count("record", Compensate, End) >= 1 && fx.count("decide", Execute, End) >= 1
    })
    .await;
    well_formed(&fx)?;
    check!(
        fx.count("decide", Execute, Start) == 1,
        "decide started {} times, expected once",
        fx.count("decide", Execute, Start)
    );
    for s in ["flaky", "record"] {
        let (starts, ends) = (fx.count(s, Compensate, Start), fx.count(s, Compensate, End));
        check!(
            starts == 1 && ends == 1,
            "`{s}`'s compensation: {starts} start(s), {ends} end(s), expected 1 and 1; effects: {}",
            fx.summary()
        );
    }
    for s in ["slow", "bounded", "decide"] {
        check!(
            fx.count(s, Compensate, Start) == 0,
            "`{s}` has no compensation, yet one ran: {}",
            fx.summary()
        );
    }
    let flaky_end = at(&fx, "flaky", Compensate, End)?;
    let record_start = at(&fx, "record", Compensate, Start)?;
    check!(
        record_start >= flaky_end,
        "record's compensation started before flaky's ended (reverse order expected): {}",
        fx.summary()
    );
    Ok(())
}

/// Scenario 4: A step longer than the coordinator's heartbeat timeout completes in
/// one attempt, kept alive by heartbeats seen on the wire.
async fn heartbeats(env: &Env) -> Outcome {
    let p = env.subjects.prefix().to_owned();
    let replies = watch(env, format!("{p}.reply.>")).await?;
    let commands = watch(env, env.subjects.step_any_version(FLOW, "slow")).await?;
    let mut i = input("heartbeats");
    i.slow_ms = 7000;
    let run = start(env, &i).await?;
    let report = finish(env, run, Duration::from_secs(25)).await?;
    ended_as(&report, RunStatus::Completed)?;
    let slow = step(&report, "slow")?;
    check!(
        slow.attempts == 1 && slow.status == StepStatus::Completed,
        "slow: {:?} after {} attempts, expected completed after 1",
        slow.status,
        slow.attempts
    );
    // The slow step's command(s) of this run, then its heartbeats.
    let slow_commands = commands_of(&commands.drain().await, run);
    check!(
        slow_commands.len() == 1,
        "{} command(s) for slow seen on its subject, expected 1",
        slow_commands.len()
    );
    let slow_id = slow_commands[0].0;
    let replies = replies.drain().await;
    let beats =
        replies.iter().filter(|r| r.command_id == slow_id && r.kind == Heartbeat::KIND).count();
    check!(beats >= 5, "{beats} heartbeat(s) for slow's command during its 7 s, expected >= 5");
    acked_first(&replies, &slow_commands)?;
    let fx = effects_when(env, run, all_ended).await;
    each_step_once(&fx, &STEPS)?;
    // Acked before the handler ran, not after: the ack was on the wire
    // before the 7 s handler's `end` (same host, same clock; 7 s of margin).
    let acked = replies.iter().find(|r| r.command_id == slow_id && r.kind == Ack::KIND);
    let ended = at(&fx, "slow", Execute, End)?;
    check!(
        acked.is_some_and(|a| a.at_ms < ended),
        "slow's `step.ack` reached the kit at {:?} ms, not before its 7 s handler ended (`end` at {ended} ms): ack before the handler starts (protocol §5.1)",
        acked.map(|a| a.at_ms)
    );
    Ok(())
}

/// Scenario 5: `bounded` sleeps past its 1 s timeout: the worker stops it (stopped,
/// no end), the outcome is unknown (maybe done) and the run rolls back.
async fn step_timeout(env: &Env) -> Outcome {
    let mut commands = env
        .nats
        .subscribe(env.subjects.step_any_version(FLOW, "bounded"))
        .await
        .map_err(|e| format!("cannot subscribe: {e}"))?;
    env.nats.flush().await.map_err(|e| format!("cannot flush: {e}"))?;
    let mut i = input("timeout");
    i.bounded_ms = 5000;
    let (run, report) = run_to_end(env, &i, Duration::from_secs(20)).await?;
    // The command as the worker got it: its timeout and absolute deadline.
    let mut sent = None;
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(200), commands.next()).await
    {
        if let Ok(c) = orchestrix_proto::decode::<StepCommand>(&msg.payload)
            && c.run_id == run.as_uuid()
        {
            sent = Some(c);
        }
    }
    let sent = sent.ok_or("bounded's command was not seen on its step subject")?;
    check!(
        sent.timeout == Some(BOUNDED_TIMEOUT),
        "bounded's command has timeout {:?}, expected {BOUNDED_TIMEOUT:?}",
        sent.timeout
    );
    ended_as(&report, RunStatus::Failed)?;
    let bounded = step(&report, "bounded")?;
    // A handler stopped at its timeout may have had its effect: the
    // coordinator reports the attempt's outcome as unknown (not retried).
    check!(
        bounded.status == StepStatus::Unknown && bounded.attempts == 1,
        "bounded: {:?} after {} attempt(s), expected unknown (maybe done) after 1: {}",
        bounded.status,
        bounded.attempts,
        one_line(&report)
    );
    check!(
        report.failed_step.as_deref() == Some("bounded"),
        "failed step {:?}, expected bounded",
        report.failed_step
    );
    let decide = step(&report, "decide")?;
    check!(decide.attempts == 0, "decide ran ({} attempts) after bounded failed", decide.attempts);
    compensated(&report, &["record", "flaky"])?;
    let fx = effects_when(env, run, |fx| {
        fx.count("bounded", Execute, Stopped) >= 1 && fx.count("record", Compensate, End) >= 1
    })
    .await;
    well_formed(&fx)?;
    let (starts, stopped, ends) = (
        fx.count("bounded", Execute, Start),
        fx.count("bounded", Execute, Stopped),
        fx.count("bounded", Execute, End),
    );
    check!(
        (starts, stopped, ends) == (1, 1, 0),
        "bounded: {starts} start(s), {stopped} stopped, {ends} end(s); expected 1, 1, 0: {}",
        fx.summary()
    );
    // Stopped at the end of its budget: 1 s from its start, or its
    // deadline if that comes first (the time the command spent in transit).
    let (started, stopped) =
        (at(&fx, "bounded", Execute, Start)?, at(&fx, "bounded", Execute, Stopped)?);
    let timeout = u64::try_from(BOUNDED_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
    let due = sent.deadline_ms.map_or(started + timeout, |d| d.min(started + timeout));
    // 20 ms of leeway for rounding to ms and timer granularity.
    check!(
        stopped + 20 >= due && stopped <= due + 1500,
        "bounded was stopped {} ms after it started, {} ms after its budget ended (expected within 0..1500 ms)",
        stopped.saturating_sub(started),
        i128::from(stopped) - i128::from(due)
    );
    check!(
        fx.count("decide", Execute, Start) == 0,
        "decide ran after bounded timed out: {}",
        fx.summary()
    );
    for s in ["flaky", "record"] {
        check!(
            fx.count(s, Compensate, Start) == 1,
            "`{s}` compensated {} times, expected once: {}",
            fx.count(s, Compensate, Start),
            fx.summary()
        );
    }
    Ok(())
}

/// A command for `step` of the flow's registered version.
fn raw_command(
    version: &str,
    step: &str,
    index: u32,
    kind: CommandKind,
) -> Result<StepCommand, String> {
    Ok(StepCommand {
        command_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        flow: FLOW.into(),
        version: version.into(),
        step: step.into(),
        step_index: index,
        kind,
        attempt: 1,
        input: Payload::encode(&input("raw"))
            .map_err(|e| format!("cannot encode an input: {e}"))?,
        outputs: Vec::new(),
        timeout: None,
        start_by_ms: None,
        deadline_ms: None,
        acks: false,
        sampled: None,
        traceparent: None,
    })
}

/// What a worker answered to a raw request.
enum Answer {
    Error(WireError),
    Other(String),
}

/// Sends `payload` on `step`'s subject as a request, with the header that
/// names its `kind` (as coordinators send it); the decoded answer.
async fn ask(
    env: &Env,
    version: &str,
    step: &str,
    kind: &str,
    payload: Vec<u8>,
) -> Result<Answer, String> {
    let subject = env.subjects.step(FLOW, version, step);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(orchestrix_proto::headers::MESSAGE_KIND, kind);
    let request = env.nats.request_with_headers(subject.clone(), headers, payload.into());
    let reply = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .map_err(|_| format!("no answer on {subject} within 5 s"))?
        .map_err(|e| format!("no answer on {subject}: {e}"))?;
    let kind = orchestrix_proto::peek_kind(&reply.payload)
        .map(|(_, k)| k)
        .map_err(|e| format!("the answer does not decode: {e}"))?;
    if kind == WireError::KIND {
        return orchestrix_proto::decode::<WireError>(&reply.payload)
            .map(Answer::Error)
            .map_err(|e| format!("the `error` answer does not decode: {e}"));
    }
    let detail = match orchestrix_proto::decode::<orchestrix_proto::StepOutcome>(&reply.payload) {
        Ok(o) => format!("{kind} {:?}", o.result),
        Err(_) => kind,
    };
    Ok(Answer::Other(detail))
}

/// Checks the answer is an `error` with `code`.
/// An `expired` error must name the command it refuses, and its run.
fn names_the_command(e: &WireError, cmd: &StepCommand) -> Result<(), String> {
    check!(
        e.command_id == Some(cmd.command_id) && e.run_id == Some(cmd.run_id),
        "the `expired` error names command {:?} of run {:?}, expected {} of {}",
        e.command_id,
        e.run_id,
        cmd.command_id,
        cmd.run_id
    );
    Ok(())
}

fn expect_error(answer: Answer, code: &str, what: &str) -> Result<WireError, String> {
    match answer {
        Answer::Error(e) if e.code == code => Ok(e),
        Answer::Error(e) => Err(format!(
            "{what}: answered `error` code {:?} ({}), expected code {code}",
            e.code, e.message
        )),
        Answer::Other(o) => {
            Err(format!("{what}: answered {o}, expected an `error` with code {code}"))
        }
    }
}

/// No effect of `run` shows within a short observation window.
async fn nothing_ran(env: &Env, run: Uuid, what: &str) -> Outcome {
    let fx =
        effects::wait_for(&env.effects, run, Duration::from_millis(300), |fx| !fx.is_empty()).await;
    check!(fx.is_empty(), "{what}: the worker ran a handler all the same: {}", fx.summary());
    Ok(())
}

/// Scenario 6: A command past its deadline, and one past its start-by time
/// (deadline ahead), are each refused with `expired`, and not run.
async fn deadline_refusal(env: &Env) -> Outcome {
    let version = env.version().await?;
    let mut cmd = raw_command(&version, "record", 0, CommandKind::Execute)?;
    let now = orchestrix_proto::time::unix_ms(std::time::SystemTime::now());
    cmd.deadline_ms = Some(now.saturating_sub(10_000));
    let bytes = orchestrix_proto::encode(&cmd).map_err(|e| format!("cannot encode: {e}"))?;
    let answer = ask(env, &version, "record", StepCommand::KIND, bytes).await?;
    let e = expect_error(answer, WireError::CODE_EXPIRED, "a command 10 s past its deadline")?;
    names_the_command(&e, &cmd)?;
    nothing_ran(env, cmd.run_id, "a command past its deadline").await?;

    // Past its start-by time, its deadline a minute away: not started either
    // (the coordinator has sent it elsewhere already).
    let mut cmd = raw_command(&version, "record", 0, CommandKind::Execute)?;
    cmd.start_by_ms = Some(now.saturating_sub(10_000));
    cmd.deadline_ms = Some(now + 60_000);
    let bytes = orchestrix_proto::encode(&cmd).map_err(|e| format!("cannot encode: {e}"))?;
    let answer = ask(env, &version, "record", StepCommand::KIND, bytes).await?;
    let e = expect_error(
        answer,
        WireError::CODE_EXPIRED,
        "a command 10 s past its startByMs (deadline 60 s ahead)",
    )?;
    names_the_command(&e, &cmd)?;
    nothing_ran(env, cmd.run_id, "a command past its startByMs").await
}

/// An envelope like the codec's, with any version, kind and body.
#[derive(serde::Serialize)]
struct RawEnvelope<'a, B> {
    v: u16,
    kind: &'a str,
    body: &'a B,
}

/// Scenario 7: Garbage, another protocol version and another kind of message on a
/// step subject are each answered `malformed`, and the worker goes on.
async fn malformed_input(env: &Env) -> Outcome {
    let version = env.version().await?;
    let garbage = b"\xc1 this is not MessagePack \xff\x00".to_vec();
    let e = ask(env, &version, "record", StepCommand::KIND, garbage).await?;
    expect_error(e, WireError::CODE_MALFORMED, "garbage bytes")?;

    let cmd = raw_command(&version, "record", 0, CommandKind::Execute)?;
    let future = RawEnvelope { v: PROTOCOL_VERSION + 1, kind: StepCommand::KIND, body: &cmd };
    let bytes = rmp_serde::to_vec_named(&future).map_err(|e| format!("cannot encode: {e}"))?;
    let e = ask(env, &version, "record", StepCommand::KIND, bytes).await?;
    expect_error(
        e,
        WireError::CODE_MALFORMED,
        &format!("a command of protocol version {}", PROTOCOL_VERSION + 1),
    )?;
    nothing_ran(env, cmd.run_id, "a command of another protocol version").await?;

    let hb = Heartbeat {
        command_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        attempt: 1,
        worker: "kit".into(),
    };
    let bytes = orchestrix_proto::encode(&hb).map_err(|e| format!("cannot encode: {e}"))?;
    let e = ask(env, &version, "record", Heartbeat::KIND, bytes).await?;
    expect_error(e, WireError::CODE_MALFORMED, "a `step.heartbeat` on a step subject")?;

    let (run, report) = run_to_end(env, &input("after-malformed"), Duration::from_secs(20)).await?;
    check!(
        report.status == RunStatus::Completed,
        "a normal run after the malformed messages: {:?}, expected completed: {}",
        report.status,
        one_line(&report)
    );
    let fx = effects_when(env, run, all_ended).await;
    each_step_once(&fx, &STEPS)
}

/// Scenario 8: A run cancelled while `slow` runs: `slow` is stopped, the completed
/// steps compensated in reverse, the run ends cancelled.
async fn cancel(env: &Env) -> Outcome {
    let mut i = input("cancel");
    i.slow_ms = 20_000;
    let run = start(env, &i).await?;
    let fx = effects_when(env, run, |fx| fx.count("slow", Execute, Start) >= 1).await;
    check!(fx.count("slow", Execute, Start) == 1, "slow did not start: {}", fx.summary());
    env.client
        .cancel(run, "conformance-kit", Some("conformance scenario 8"))
        .await
        .map_err(|e| format!("cancel refused: {e}"))?;
    let report = finish(env, run, Duration::from_secs(15)).await?;
    ended_as(&report, RunStatus::Cancelled)?;
    compensated(&report, &["record", "flaky"])?;
    let fx = effects_when(env, run, |fx| {
        fx.count("slow", Execute, Stopped) >= 1 && fx.count("record", Compensate, End) >= 1
    })
    .await;
    well_formed(&fx)?;
    check!(
        fx.count("slow", Execute, Stopped) == 1 && fx.count("slow", Execute, End) == 0,
        "slow: {} stopped, {} end(s); expected stopped once and no end: {}",
        fx.count("slow", Execute, Stopped),
        fx.count("slow", Execute, End),
        fx.summary()
    );
    for s in ["bounded", "decide"] {
        check!(
            fx.count(s, Execute, Start) == 0,
            "`{s}` ran in a run cancelled before it: {}",
            fx.summary()
        );
    }
    for s in ["flaky", "record"] {
        check!(
            fx.count(s, Compensate, Start) == 1,
            "`{s}` compensated {} times, expected once: {}",
            fx.count(s, Compensate, Start),
            fx.summary()
        );
    }
    let flaky_end = at(&fx, "flaky", Compensate, End)?;
    let record_start = at(&fx, "record", Compensate, Start)?;
    check!(
        record_start >= flaky_end,
        "record compensated before flaky (reverse order expected): {}",
        fx.summary()
    );
    Ok(())
}

/// Scenario 9: The coordinator driving a run is SIGKILLed while `slow` runs; a second
/// coordinator on the same JetStream store takes the run over; `slow` is
/// not started again and every step ran once.
async fn coordinator_kill(env: &Env) -> Outcome {
    // Only the first coordinator is up: it is the one that takes the run.
    let live = env.coordinators.lock().await.len();
    check!(live == 1, "{live} coordinators before the run, expected 1");
    // Everything under the prefix, seen passively through one subscription
    // (so in one order): the commands on the step and inquiry subjects — who
    // sent each (its reply subject names the coordinator) — and what the
    // worker answered where.
    let wire = watch(env, format!("{}.>", env.subjects.prefix())).await?;
    let mut i = input("takeover");
    i.slow_ms = 6000;
    let run = start(env, &i).await?;
    let fx = effects_when(env, run, |fx| fx.count("slow", Execute, Start) >= 1).await;
    check!(fx.count("slow", Execute, Start) == 1, "slow did not start: {}", fx.summary());
    env.start_coordinator().await.map_err(|e| format!("the second coordinator: {e}"))?;
    env.kill_first_coordinator().await;
    let report = finish(env, run, Duration::from_secs(30)).await?;
    let seen = wire.drain().await;
    let step_prefix = format!("{}.step.", env.subjects.prefix());
    let senders: Vec<(String, String)> = seen
        .iter()
        .filter(|s| s.subject.starts_with(&step_prefix))
        .filter_map(|s| match &s.command {
            Some((r, step)) if *r == run.as_uuid() => {
                Some((step.clone(), s.reply.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .collect();
    let sender = |step: &str| senders.iter().find(|(s, _)| s == step).map(|(_, r)| r.clone());
    check!(
        sender("record").is_some()
            && sender("decide").is_some()
            && sender("record") != sender("decide"),
        "record's and decide's commands should come from two coordinators (the run taken over), saw {senders:?}"
    );
    latest_reply(&seen, run)?;
    ended_as(&report, RunStatus::Completed)?;
    for s in &report.steps {
        check!(
            s.attempts == 1,
            "`{}` took {} attempts, expected 1: {}",
            s.name,
            s.attempts,
            one_line(&report)
        );
    }
    let fx = effects_when(env, run, all_ended).await;
    each_step_once(&fx, &STEPS)?;
    no_compensation(&fx)
}

/// After a takeover `slow`'s command is delivered again (the new
/// coordinator's inquiry, under the same command id, with its own reply
/// subject): the worker must send that command's heartbeats and outcome to
/// the reply subject of the latest delivery (protocol §5.1 step 2).
///
/// In wire order, a message of the worker about the command on an older
/// delivery's reply subject is tolerated only while it may have crossed the
/// new delivery: before the worker sent anything to the new subject, and
/// within 1 s of the new delivery (heartbeats come at least every second).
fn latest_reply(seen: &[Seen], run: RunId) -> Outcome {
    let slow = commands_of(seen, run).into_iter().find(|(_, step)| step == "slow");
    let Some((id, _)) = slow else {
        return Err("no command for slow seen on its step subject".to_owned());
    };
    let deliveries: Vec<&Seen> =
        seen.iter().filter(|s| s.command_id == id && s.kind == StepCommand::KIND).collect();
    let subjects: std::collections::BTreeSet<Option<&str>> =
        deliveries.iter().map(|d| d.reply.as_deref()).collect();
    check!(
        subjects.len() >= 2,
        "slow's command {id} was delivered {} time(s), to reply subject(s) {subjects:?}: expected the coordinator that took the run over to deliver it again (inquiry) with its own reply subject",
        deliveries.len()
    );
    let mut latest: Option<&Seen> = None;
    let mut answered_latest = false;
    let mut log: Vec<String> = Vec::new();
    for s in seen.iter().filter(|s| s.command_id == id) {
        if s.kind == StepCommand::KIND {
            log.push(format!(
                "{} on {} (reply {})",
                s.kind,
                s.subject,
                s.reply.as_deref().unwrap_or("-")
            ));
            answered_latest = latest.is_some_and(|l| l.reply == s.reply) && answered_latest;
            latest = Some(s);
            continue;
        }
        log.push(format!("{} to {}", s.kind, s.subject));
        let Some(d) = latest else { continue };
        if d.reply.as_deref() == Some(s.subject.as_str()) {
            answered_latest = true;
            continue;
        }
        let crossed = !answered_latest && s.at.duration_since(d.at) <= Duration::from_secs(1);
        check!(
            crossed,
            "slow's command {id}: a `{}` went to {} after the command was delivered again with reply subject {} ({}); protocol §5.1: after a re-delivery, heartbeats and the outcome go to the latest delivery's reply subject. On the wire, in order: {}",
            s.kind,
            s.subject,
            d.reply.as_deref().unwrap_or("-"),
            if answered_latest {
                "the worker had already answered there".to_owned()
            } else {
                format!("{} ms later", s.at.duration_since(d.at).as_millis())
            },
            log.join("; ")
        );
    }
    // The latest delivery was answered with the outcome, on its reply subject.
    let last = deliveries.last().map(|d| d.reply.clone()).unwrap_or_default();
    let after = seen.iter().rposition(|s| s.command_id == id && s.kind == StepCommand::KIND);
    let outcome = after.is_some_and(|i| {
        seen[i..].iter().any(|s| {
            s.command_id == id
                && s.kind == StepOutcome::KIND
                && Some(s.subject.as_str()) == last.as_deref()
        })
    });
    check!(
        outcome,
        "slow's command {id}: no `step.outcome` on the reply subject of its latest delivery ({}); on the wire, in order: {}",
        last.as_deref().unwrap_or("-"),
        log.join("; ")
    );
    Ok(())
}

/// Scenario 10: Next to the Rust reference worker: the same version, 20 runs shared
/// between both, every step once.
async fn mixed_replicas(env: &Env) -> Outcome {
    let (versions, workers) = env.registry().await?;
    check!(
        versions.len() == 1,
        "the registry holds {} versions of `{FLOW}` ({versions:?}): the worker under test and the Rust reference do not define the same flow",
        versions.len()
    );
    check!(workers == 2, "{workers} live workers of `{FLOW}`, expected 2");
    let inputs: Vec<ConformanceInput> = (0..20).map(|n| input(&format!("mixed{n}"))).collect();
    let runs = futures::future::join_all(
        inputs.iter().map(|i| run_to_end(env, i, Duration::from_secs(30))),
    )
    .await;
    let mut ids = Vec::new();
    for r in runs {
        let (run, report) = r?;
        check!(
            report.status == RunStatus::Completed,
            "run {run}: {:?}, expected completed: {}",
            report.status,
            one_line(&report)
        );
        ids.push(run);
    }
    let mut names = std::collections::BTreeSet::new();
    for run in ids {
        let fx = effects_when(env, run, all_ended).await;
        each_step_once(&fx, &STEPS).map_err(|e| format!("run {run}: {e}"))?;
        names.extend(fx.0.iter().map(|e| e.worker.clone()));
    }
    check!(names.len() == 2, "commands went to workers {names:?}, expected both");
    Ok(())
}

/// Scenario 11: A compensation command for `decide`, which has none: `no_handler`.
async fn no_handler(env: &Env) -> Outcome {
    let version = env.version().await?;
    let cmd = raw_command(&version, "decide", 4, CommandKind::Compensate)?;
    let bytes = orchestrix_proto::encode(&cmd).map_err(|e| format!("cannot encode: {e}"))?;
    let answer = ask(env, &version, "decide", StepCommand::KIND, bytes).await?;
    expect_error(answer, WireError::CODE_NO_HANDLER, "a compensate command for `decide`")?;
    nothing_ran(env, cmd.run_id, "a command without a handler").await
}
