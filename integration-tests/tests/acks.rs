//! Acks for commands read together (`step.acks`): a real worker sends one
//! message for a burst when the coordinator says it reads them, a `step.ack`
//! each when it does not, and always before the handlers start; the
//! coordinator honours a `step.acks` as it does a `step.ack`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix::{RunOptions, RunStatus, StepContext, Worker};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_coordinator::{FlowDef, StepDef};
use orchestrix_integration_tests::{Ledger, NatsServer};
use orchestrix_proto::{
    Ack, Acked, Acks, CommandKind, Heartbeat, Message, OutcomeResult, Payload, StepCommand,
    StepOutcome, Subjects, decode, encode, headers, peek_kind,
};
use orchestrix_worker::NatsOptions;
use uuid::Uuid;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
const BURST: usize = 20;

fn command(run_id: Uuid) -> StepCommand {
    StepCommand {
        command_id: Uuid::now_v7(),
        run_id,
        flow: "burst".into(),
        version: "v1".into(),
        step: "s0".into(),
        step_index: 0,
        kind: CommandKind::Execute,
        attempt: 1,
        input: Payload::encode(&1u32).unwrap(),
        outputs: Vec::new(),
        timeout: None,
        start_by_ms: None,
        deadline_ms: None,
        acks: false,
        sampled: None,
        traceparent: None,
    }
}

/// What came back on the reply subject, in order: the kind and the command
/// ids it is about (several for a `step.acks`), and who sent the acks.
type Replies = Vec<(String, Vec<Uuid>, Option<String>)>;

/// Publishes a burst of commands from a thread and runtime of its own while
/// the worker's runtime (this test's, one thread) is held up, so that they
/// all wait in the worker's socket and are read together; then collects
/// the replies until every command has its outcome.
/// How a burst's commands say that their sender reads `step.acks`.
#[derive(Clone, Copy, Debug)]
enum Batch {
    /// The command's `acks` field (coordinators of this build).
    Field,
    /// The header `Orchestrix-Acks: batch` (older coordinators).
    Header,
    /// Not at all.
    No,
}

async fn burst(server: &NatsServer, batch: Batch, copies: usize) -> (Vec<Uuid>, Replies) {
    let url = server.url();
    let (published_tx, published_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let nats = NatsOptions::new(url).connect().await.unwrap();
            let inbox = nats.new_inbox();
            let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
            nats.flush().await.unwrap();
            let subject = Subjects::default().step("burst", "v1", "s0");
            let mut ids = Vec::new();
            for _ in 0..BURST {
                let mut cmd = command(Uuid::now_v7());
                ids.push(cmd.command_id);
                let mut h = async_nats::HeaderMap::new();
                match batch {
                    Batch::Field => cmd.acks = true,
                    Batch::Header => h.insert(headers::ACKS, headers::ACKS_BATCH),
                    Batch::No => {}
                }
                let body = Bytes::from(encode(&cmd).unwrap());
                for _ in 0..copies {
                    nats.publish_with_reply_and_headers(
                        subject.clone(),
                        inbox.clone(),
                        h.clone(),
                        body.clone(),
                    )
                    .await
                    .unwrap();
                }
            }
            nats.flush().await.unwrap();
            published_tx.send(()).unwrap();
            let mut seen: Replies = Vec::new();
            let mut answered = std::collections::HashSet::new();
            let deadline = tokio::time::Instant::now() + 20 * SECS;
            loop {
                // Every command answered, then whatever else comes within 200 ms.
                let wait = if answered.len() < BURST {
                    deadline
                } else {
                    tokio::time::Instant::now() + 200 * MS
                };
                let Ok(msg) = tokio::time::timeout_at(wait, replies.next()).await else {
                    assert_eq!(answered.len(), BURST, "every command answered within 20 s");
                    break;
                };
                let msg = msg.unwrap();
                let (_, kind) = peek_kind(&msg.payload).unwrap();
                let entry = match kind.as_str() {
                    Ack::KIND => {
                        let a: Ack = decode(&msg.payload).unwrap();
                        (kind, vec![a.command_id], Some(a.worker))
                    }
                    Acks::KIND => {
                        let a: Acks = decode(&msg.payload).unwrap();
                        let ids = a.commands.iter().map(|c| c.command_id).collect();
                        (kind, ids, Some(a.worker))
                    }
                    Heartbeat::KIND => {
                        let h: Heartbeat = decode(&msg.payload).unwrap();
                        (kind, vec![h.command_id], Some(h.worker))
                    }
                    StepOutcome::KIND => {
                        let o: StepOutcome = decode(&msg.payload).unwrap();
                        assert!(
                            matches!(o.result, OutcomeResult::Completed { .. }),
                            "{:?}",
                            o.result
                        );
                        answered.insert(o.command_id);
                        (kind, vec![o.command_id], None)
                    }
                    other => panic!("unexpected reply `{other}`"),
                };
                seen.push(entry);
            }
            let _ = done_tx.send((ids, seen));
        });
    });
    // Hold the worker's only thread while the burst lands in its socket.
    published_rx.recv_timeout(20 * SECS).expect("the burst was published");
    std::thread::sleep(SECS);
    done_rx.await.unwrap()
}

async fn worker(server: &NatsServer, ledger: &Ledger) -> Worker {
    let ledger = ledger.clone();
    Worker::builder()
        .nats(NatsOptions::new(server.url()))
        // No heartbeat in the middle of the burst's replies.
        .heartbeat_interval(30 * SECS)
        .steps::<u32>("burst", move |f| {
            f.step("s0", move |ctx: StepContext<u32>| {
                ledger.log(ctx.command_id().to_string());
                async { Ok(()) }
            })
        })
        .start()
        .await
        .unwrap()
}

/// Every command acked exactly once, before its outcome; each handler ran once.
fn check_acked_first(ids: &[Uuid], replies: &Replies, ledger: &Ledger) {
    let mut acked: HashMap<Uuid, usize> = HashMap::new();
    let mut answered: HashMap<Uuid, usize> = HashMap::new();
    for (i, (kind, about, _)) in replies.iter().enumerate() {
        for id in about {
            if kind == StepOutcome::KIND {
                answered.insert(*id, i);
            } else if kind != Heartbeat::KIND {
                *acked.entry(*id).or_default() += 1;
                answered.entry(*id).and_modify(|_| panic!("{id} acked after its outcome"));
            }
        }
    }
    for id in ids {
        assert_eq!(acked.get(id), Some(&1), "{id} acked once: {replies:?}");
        assert!(answered.contains_key(id), "{id} answered");
    }
    let ran = ledger.lines();
    assert_eq!(ran.len(), BURST, "each handler ran once: {ran:?}");
    for id in ids {
        assert_eq!(ran.iter().filter(|r| **r == id.to_string()).count(), 1, "{id} ran once");
    }
}

// A burst to a coordinator that reads `step.acks` is acknowledged in fewer
// messages than it has commands, every one before its outcome.
#[tokio::test]
async fn a_burst_of_commands_is_acknowledged_together() {
    let server = NatsServer::start();
    // Said in the command, or in the header of an older coordinator.
    for batch in [Batch::Field, Batch::Header] {
        let ledger = Ledger::default();
        let w = worker(&server, &ledger).await;
        let (ids, replies) = burst(&server, batch, 1).await;
        check_acked_first(&ids, &replies, &ledger);
        let ack_messages: Vec<_> =
            replies.iter().filter(|(k, ..)| k != StepOutcome::KIND).collect();
        assert!(!replies.iter().any(|(k, ..)| k == Heartbeat::KIND), "no heartbeat: {replies:?}");
        assert!(
            ack_messages.len() < BURST && ack_messages.iter().any(|(k, ..)| k == Acks::KIND),
            "{batch:?}: {BURST} commands read together, acknowledged in {} messages: {ack_messages:?}",
            ack_messages.len()
        );
        for (_, _, worker) in &ack_messages {
            assert_eq!(worker.as_deref(), Some(w.id()), "acks name their worker");
        }
        w.shutdown().await;
    }
}

// A burst whose handlers do not all finish at once: a third are done at
// once (answered from the loop that read them), a third yield once (woken
// at once, so they finish in a task of their own), a third wait 300 ms
// with a heartbeat every 50 ms. Each is acked once, before it runs; the
// waiting ones beat while they wait, between their ack and their outcome.
#[tokio::test]
async fn a_burst_of_handlers_that_wait_is_acked_first_and_heartbeats() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let turn = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = {
        let (ledger, turn) = (ledger.clone(), turn.clone());
        Worker::builder()
            .nats(NatsOptions::new(server.url()))
            .heartbeat_interval(50 * MS)
            .steps::<u32>("burst", move |f| {
                f.step("s0", move |ctx: StepContext<u32>| {
                    ledger.log(ctx.command_id().to_string());
                    let turn = turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        match turn % 3 {
                            0 => {}
                            1 => tokio::task::yield_now().await,
                            _ => tokio::time::sleep(300 * MS).await,
                        }
                        Ok(())
                    }
                })
            })
            .start()
            .await
            .unwrap()
    };
    let (ids, replies) = burst(&server, Batch::Field, 1).await;
    check_acked_first(&ids, &replies, &ledger);
    let beating: std::collections::HashSet<Uuid> = replies
        .iter()
        .filter(|(k, ..)| k == Heartbeat::KIND)
        .flat_map(|(_, about, _)| about.iter().copied())
        .collect();
    assert!(
        beating.len() >= BURST / 3,
        "the {} handlers that wait 300 ms heartbeat: {beating:?}",
        BURST / 3
    );
    for id in &beating {
        let first = |kind: &str| replies.iter().position(|(k, a, _)| k == kind && a.contains(id));
        let (Some(beat), Some(outcome)) = (first(Heartbeat::KIND), first(StepOutcome::KIND)) else {
            panic!("{id} beat and was answered: {replies:?}");
        };
        assert!(beat < outcome, "{id} beat before its outcome");
    }
    w.shutdown().await;
}

// With a small `max_payload` a burst's acks are split over several
// `step.acks`, each within the limit: every command is still acked once,
// before it runs.
#[tokio::test]
async fn a_burst_over_a_small_max_payload_is_acknowledged_in_several_messages() {
    let server = NatsServer::start_with_config("max_payload: 1024");
    let ledger = Ledger::default();
    let w = worker(&server, &ledger).await;
    let (ids, replies) = burst(&server, Batch::Field, 1).await;
    check_acked_first(&ids, &replies, &ledger);
    let batches: Vec<usize> =
        replies.iter().filter(|(k, ..)| k == Acks::KIND).map(|(_, about, _)| about.len()).collect();
    assert!(batches.len() >= 2, "{batches:?}");
    assert!(batches.iter().all(|n| *n <= 1024 / 256), "at most 4 commands an ack: {batches:?}");
    w.shutdown().await;
}

// Each command of a burst sent twice (the same command id): each runs once,
// is acked before its first outcome, and no copy is refused.
#[tokio::test]
async fn copies_of_commands_inside_a_burst_run_once() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let w = worker(&server, &ledger).await;
    let (ids, replies) = burst(&server, Batch::Field, 2).await;
    let ran = ledger.lines();
    for id in &ids {
        assert_eq!(ran.iter().filter(|r| **r == id.to_string()).count(), 1, "{id} ran once");
        let first_outcome = replies
            .iter()
            .position(|(k, about, _)| k == StepOutcome::KIND && about.contains(id))
            .expect("answered");
        assert!(
            replies[..first_outcome]
                .iter()
                .any(|(k, about, _)| k != StepOutcome::KIND && about.contains(id)),
            "{id} acked before its outcome: {replies:?}"
        );
    }
    w.shutdown().await;
}

// Without the field or the header (a coordinator of an older build) every
// command gets a `step.ack` of its own.
#[tokio::test]
async fn commands_that_do_not_ask_for_batches_are_acknowledged_one_by_one() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let w = worker(&server, &ledger).await;
    let (ids, replies) = burst(&server, Batch::No, 1).await;
    check_acked_first(&ids, &replies, &ledger);
    let kinds: Vec<_> = replies.iter().filter(|(k, ..)| k != StepOutcome::KIND).collect();
    assert_eq!(kinds.len(), BURST, "{kinds:?}");
    assert!(kinds.iter().all(|(k, ..)| k == Ack::KIND), "{kinds:?}");
    w.shutdown().await;
}

// The coordinator takes a `step.acks` as the ack of each command in it: a
// worker that answers after the ack window, having acked that way, is not
// sent the command again, and its run completes in one attempt a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_honours_a_step_acks() {
    let server = NatsServer::start();
    let mut def = FlowDef::new("acked");
    for s in ["a", "b"] {
        def.steps.push(StepDef::new(s));
    }
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let node = Node::builder()
        .bus_options(
            NatsBusOptions::default()
                .ack_timeout(SECS)
                .clock_skew(200 * MS)
                .heartbeat_timeout(5 * SECS),
        )
        .flows(vec![def])
        .start(conn)
        .await
        .unwrap();
    // A worker of another make: `step.acks` only, and no heartbeat.
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let subjects = Subjects::default();
    let mut sub = nats.subscribe(subjects.step_any_version("acked", "*")).await.unwrap();
    orchestrix_worker::sync(&nats).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let fake = {
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let cmd: StepCommand = decode(&msg.payload).unwrap();
                // Untraced: no header at all, the field says it.
                seen_tx.send((cmd.step.to_string(), cmd.acks, msg.headers.is_some())).unwrap();
                let reply = msg.reply.unwrap();
                let acks = Acks {
                    worker: "fake".into(),
                    commands: vec![Acked {
                        command_id: cmd.command_id,
                        run_id: cmd.run_id,
                        attempt: cmd.attempt,
                    }],
                };
                nats.publish(reply.clone(), Bytes::from(encode(&acks).unwrap())).await.unwrap();
                // Past the ack window (1 s + 200 ms): unacked, it would go again.
                tokio::time::sleep(2 * SECS).await;
                let done = StepOutcome {
                    command_id: cmd.command_id,
                    run_id: cmd.run_id,
                    attempt: cmd.attempt,
                    kind: cmd.kind,
                    result: OutcomeResult::Completed { output: Payload::nil() },
                };
                nats.publish(reply, Bytes::from(encode(&done).unwrap())).await.unwrap();
            }
        })
    };
    let report =
        tokio::time::timeout(20 * SECS, node.coordinator().run("acked", &1u32, RunOptions::new()))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    for s in &report.steps {
        assert_eq!(s.attempts, 1, "{report}");
    }
    fake.abort();
    let mut seen = Vec::new();
    while let Ok(s) = seen_rx.try_recv() {
        seen.push(s);
    }
    assert_eq!(
        seen,
        vec![("a".to_owned(), true, false), ("b".to_owned(), true, false)],
        "each step's command sent once, saying `acks`, with no header"
    );
    node.shutdown().await;
}

// A handler that blocks its thread before its first await (3 s of
// synchronous work) holds up only itself: the other commands of its burst,
// and those sent after it, are answered while it blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_holds_up_only_itself() {
    let server = NatsServer::start();
    let w = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<u32>("burst", |f| {
            f.step("s0", |ctx: StepContext<u32>| {
                if ctx.input == 0 {
                    std::thread::sleep(3 * SECS);
                }
                async { Ok(()) }
            })
        })
        .start()
        .await
        .unwrap();
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let subject = Subjects::default().step("burst", "v1", "s0");
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::ACKS, headers::ACKS_BATCH);
    let send = |input: u32| {
        let mut cmd = command(Uuid::now_v7());
        cmd.input = Payload::encode(&input).unwrap();
        let body = Bytes::from(encode(&cmd).unwrap());
        let (nats, subject, inbox, h) = (nats.clone(), subject.clone(), inbox.clone(), h.clone());
        async move {
            nats.publish_with_reply_and_headers(subject, inbox, h, body).await.unwrap();
            nats.flush().await.unwrap();
            cmd.command_id
        }
    };
    let blocker = send(0).await;
    let mut quick = Vec::new();
    for _ in 0..3 {
        quick.push(send(1).await);
    }
    tokio::time::sleep(200 * MS).await;
    for _ in 0..3 {
        quick.push(send(1).await);
    }
    let mut answered = Vec::new();
    while answered.len() < quick.len() + 1 {
        let msg = tokio::time::timeout(20 * SECS, replies.next()).await.unwrap().unwrap();
        let (_, kind) = peek_kind(&msg.payload).unwrap();
        if kind == StepOutcome::KIND {
            answered.push(decode::<StepOutcome>(&msg.payload).unwrap().command_id);
        }
    }
    assert_eq!(answered.last(), Some(&blocker), "the blocked handler answers last: {answered:?}");
    w.shutdown().await;
}
