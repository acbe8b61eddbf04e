//! Sagas over a real NATS server with real workers: scenarios and faults.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix::{
    Coordinator, RunOptions, RunReport, RunStatus, StepContext, StepError, StepStatus, Worker,
};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::nats::{Client, NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::{NatsServer, eventually};
use orchestrix_proto::{
    CommandKind, OutcomeResult, Payload, StepCommand, StepOutcome, Subjects, WireError, decode,
    encode,
};
use orchestrix_worker::NatsOptions;
use uuid::Uuid;

type Journal = Arc<Mutex<Vec<String>>>;

fn log(j: &Journal, line: String) {
    j.lock().unwrap().push(line);
}

fn entries(j: &Journal) -> Vec<String> {
    j.lock().unwrap().clone()
}

/// A coordinator on `server`, serving the flows of `toml`, with short liveness timeouts.
struct Setup {
    coordinator: Coordinator,
    client: Client,
    nats: async_nats::Client,
    _node: Node,
}

async fn setup(server: &NatsServer, toml: &str, ack: Duration, silence: Duration) -> Setup {
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let options = NatsBusOptions::default()
        .ack_timeout(ack)
        .heartbeat_timeout(silence)
        .timeout_grace(Duration::from_millis(500))
        .clock_skew(Duration::from_millis(100))
        .worker_wait(2 * SECS);
    // Only its own flows (no registry): requests for any other flow find no coordinator.
    let node = Node::builder()
        .bus_options(options)
        .store(NodeStore::Memory)
        .flows(flowfile::parse(toml).unwrap())
        .registry(false)
        .events(false)
        .start(nats.clone())
        .await
        .unwrap();
    let coordinator = node.coordinator().clone();
    let client = Client::new(nats.clone(), Subjects::default());
    Setup { coordinator, client, nats, _node: node }
}

fn worker(server: &NatsServer) -> orchestrix::WorkerBuilder {
    Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .heartbeat_interval(Duration::from_millis(100))
}

const SECS: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_completes_over_nats_and_outputs_flow_between_steps() {
    let server = NatsServer::start();
    let s = setup(&server, "[[flow]]\nname = \"order\"\n[[flow.step]]\nname = \"reserve\"\n[[flow.step]]\nname = \"charge\"\n", 5 * SECS, 5 * SECS).await;
    let w = worker(&server)
        .steps::<u32>("order", |f| {
            f.step(
                "reserve",
                |ctx: StepContext<u32>| async move { Ok(format!("res-{}", ctx.input)) },
            )
            .step("charge", |ctx| async move {
                let r: String = ctx.output("reserve")?;
                Ok(format!("{r}/charged"))
            })
        })
        .start()
        .await
        .unwrap();
    let report = s.client.run("order", &7u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let out = report.step("charge").unwrap().output.as_ref().unwrap().decode::<String>().unwrap();
    assert_eq!(out, "res-7/charged");
    // The same run can be followed by id.
    assert_eq!(s.client.status(report.run_id).await.unwrap(), report);
    assert_eq!(s.client.wait(report.run_id).await.unwrap(), report);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_compensates_in_reverse_order_across_workers() {
    let server = NatsServer::start();
    let toml = r#"
        [[flow]]
        name = "four"
        [[flow.step]]
        name = "s0"
        compensable = true
        [[flow.step]]
        name = "s1"
        compensable = true
        [[flow.step]]
        name = "s2"
        compensable = true
        [[flow.step]]
        name = "s3"
        retries = 2
        retry_delay_ms = 10
    "#;
    let s = setup(&server, toml, 5 * SECS, 5 * SECS).await;
    let j = Journal::default();
    // Steps s0 and s1 in one worker, s2 and s3 in another: the rollback crosses connections.
    let (j0, j1, j2, j3) = (j.clone(), j.clone(), j.clone(), j.clone());
    let first = worker(&server)
        .steps::<()>("four", move |f| {
            let (a, b) = (j0.clone(), j0.clone());
            let (c, d) = (j1.clone(), j1.clone());
            f.step("s0", move |_: StepContext<()>| {
                log(&a, "run s0".into());
                async { Ok(0) }
            })
            .compensate("s0", move |_| {
                log(&b, "undo s0".into());
                async { Ok(()) }
            })
            .step("s1", move |_| {
                log(&c, "run s1".into());
                async { Ok(1) }
            })
            .compensate("s1", move |_| {
                log(&d, "undo s1".into());
                async { Ok(()) }
            })
        })
        .start()
        .await
        .unwrap();
    let second = worker(&server)
        .steps::<()>("four", move |f| {
            let (a, b) = (j2.clone(), j2.clone());
            let c = j3.clone();
            f.step("s2", move |_: StepContext<()>| {
                log(&a, "run s2".into());
                async { Ok(2) }
            })
            .compensate("s2", move |ctx| {
                log(&b, "undo s2".into());
                async move {
                    // A compensation sees its own step's output.
                    assert_eq!(ctx.output::<u32>("s2")?, 2);
                    Ok(())
                }
            })
            .step("s3", move |ctx| {
                log(&c, format!("run s3 #{}", ctx.attempt()));
                async { Err::<(), _>(StepError::retryable("card declined")) }
            })
        })
        .start()
        .await
        .unwrap();
    let report = s.coordinator.run("four", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(
        entries(&j),
        [
            "run s0",
            "run s1",
            "run s2",
            "run s3 #1",
            "run s3 #2",
            "run s3 #3",
            "undo s2",
            "undo s1",
            "undo s0"
        ]
    );
    let statuses: Vec<_> = report.steps.iter().map(|s| s.status).collect();
    use StepStatus::*;
    assert_eq!(statuses, [Compensated, Compensated, Compensated, Failed]);
    assert_eq!(report.failed().unwrap().attempts, 3);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_move_to_another_replica() {
    let server = NatsServer::start();
    let toml = "[[flow]]\nname = \"r\"\n[[flow.step]]\nname = \"call\"\nretries = 30\nretry_delay_ms = 1\n";
    let s = setup(&server, toml, 5 * SECS, 5 * SECS).await;
    let j = Journal::default();
    let (ja, jb) = (j.clone(), j.clone());
    // Replica A's dependency is down; replica B's works. Both share the queue group.
    let a = worker(&server)
        .steps::<()>("r", move |f| {
            f.step("call", move |ctx: StepContext<()>| {
                log(&ja, format!("A #{}", ctx.attempt()));
                async { Err::<(), _>(StepError::retryable("dependency down on A")) }
            })
        })
        .start()
        .await
        .unwrap();
    let b = worker(&server)
        .steps::<()>("r", move |f| {
            f.step("call", move |ctx: StepContext<()>| {
                log(&jb, format!("B #{}", ctx.attempt()));
                async { Ok("served by B") }
            })
        })
        .start()
        .await
        .unwrap();
    let report = s.coordinator.run("r", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let calls = entries(&j);
    let step = report.step("call").unwrap();
    assert_eq!(calls.len() as u32, step.attempts, "one handler call per attempt: {calls:?}");
    assert_eq!(calls.last().unwrap(), &format!("B #{}", step.attempts));
    assert!(calls[..calls.len() - 1].iter().all(|c| c.starts_with("A ")));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_with_no_worker_waits_for_one_then_fails_without_spending_attempts() {
    let server = NatsServer::start();
    let toml = "[[flow]]\nname = \"lonely\"\n[[flow.step]]\nname = \"nobody\"\nretries = 1\nretry_delay_ms = 10\n";
    let s = setup(&server, toml, Duration::from_millis(300), 5 * SECS).await;
    let report = s.coordinator.run("lonely", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let step = report.step("nobody").unwrap();
    assert_eq!(step.attempts, 1, "nobody started it: no attempt is spent");
    let err = step.error.as_deref().unwrap();
    assert!(err.starts_with("no worker took the command in 2"), "{err}");
    assert!(err.contains("step `nobody` of flow `lonely`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_is_cut_at_the_step_timeout() {
    let server = NatsServer::start();
    let toml = "[[flow]]\nname = \"slow\"\n[[flow.step]]\nname = \"s\"\ntimeout_ms = 300\nretries = 1\nretry_delay_ms = 10\non_unknown = \"retry\"\n";
    let s = setup(&server, toml, 5 * SECS, 5 * SECS).await;
    let j = Journal::default();
    let jj = j.clone();
    let w = worker(&server)
        .steps::<()>("slow", move |f| {
            f.step("s", move |ctx: StepContext<()>| {
                let jj = jj.clone();
                async move {
                    log(&jj, format!("start #{}", ctx.attempt()));
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    log(&jj, "never".into());
                    Ok(())
                }
            })
        })
        .start()
        .await
        .unwrap();
    let report = s.coordinator.run("slow", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);
    let step = report.step("s").unwrap();
    assert_eq!(step.attempts, 2);
    assert_eq!(step.error.as_deref(), Some("outcome unknown: step timed out after 300ms"));
    assert_eq!(entries(&j), ["start #1", "start #2"]);
    assert_eq!(w.in_flight(), 0, "timed-out handlers are dropped, not left running");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_command_runs_the_handler_once() {
    let server = NatsServer::start();
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let j = Journal::default();
    let jj = j.clone();
    let w = worker(&server)
        .steps::<u32>("dup", move |f| {
            f.step("charge", move |ctx: StepContext<u32>| {
                log(&jj, format!("charge {}", ctx.input));
                async move { Ok(ctx.input * 2) }
            })
        })
        .start()
        .await
        .unwrap();
    let cmd = StepCommand {
        command_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        flow: "dup".into(),
        version: "v1".into(),
        step: "charge".into(),
        step_index: 0,
        kind: CommandKind::Execute,
        attempt: 1,
        input: Payload::encode(&21u32).unwrap(),
        outputs: vec![],
        timeout: None,
        start_by_ms: None,
        deadline_ms: None,
        acks: false,
        sampled: None,
        traceparent: None,
    };
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
    let subject = Subjects::default().step("dup", "v1", "charge");
    let bytes = Bytes::from(encode(&cmd).unwrap());
    let mut outcomes = Vec::new();
    for round in 0..2 {
        nats.publish_with_reply(subject.clone(), inbox.clone(), bytes.clone()).await.unwrap();
        // Read until this delivery's outcome (the first also brings an ack).
        loop {
            let msg = tokio::time::timeout(5 * SECS, replies.next())
                .await
                .unwrap_or_else(|_| panic!("round {round}: no reply; journal {:?}", entries(&j)))
                .unwrap();
            if let Ok(o) = decode::<StepOutcome>(&msg.payload) {
                outcomes.push(o);
                break;
            }
        }
    }
    assert_eq!(entries(&j), ["charge 21"], "the redelivery is answered from the cache");
    assert_eq!(outcomes[0], outcomes[1]);
    let OutcomeResult::Completed { output } = &outcomes[0].result else {
        panic!("{:?}", outcomes[0])
    };
    assert_eq!(output.decode::<u32>().unwrap(), 42);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_subject_is_answered_and_serving_goes_on() {
    let server = NatsServer::start();
    let toml = "[[flow]]\nname = \"g\"\n[[flow.step]]\nname = \"s\"\n";
    let s = setup(&server, toml, 5 * SECS, 5 * SECS).await;
    let w = worker(&server)
        .max_message_bytes(4096)
        .steps::<u32>("g", |f| {
            f.step("s", |ctx: StepContext<u32>| async move { Ok(ctx.input + 1) })
        })
        .start()
        .await
        .unwrap();
    let subjects = Subjects::default();
    let future_version = {
        #[derive(serde::Serialize)]
        struct Env<'a> {
            v: u16,
            kind: &'a str,
            body: u8,
        }
        rmp_like(&Env { v: 99, kind: "step.command", body: 1 })
    };
    let truncated = {
        let ok = encode(&orchestrix_proto::RunRequest {
            wait: true,
            ..orchestrix_proto::RunRequest::new("g", Payload::nil())
        })
        .unwrap();
        ok[..ok.len() / 2].to_vec()
    };
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff]),
        ("empty", vec![]),
        ("truncated", truncated),
        ("future version", future_version),
        ("oversized", vec![0x90; 8192]),
    ];
    // Step subject: the worker answers each with an error on the reply subject.
    for (what, bytes) in &garbage {
        let answer = s
            .nats
            .request(subjects.step("g", "v1", "s"), Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let err = decode::<WireError>(&answer.payload).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(err.message.starts_with("bad step command"), "{what}: {}", err.message);
    }
    let future = s
        .nats
        .request(subjects.step("g", "v1", "s"), Bytes::from(garbage[3].1.clone()))
        .await
        .unwrap();
    assert!(
        decode::<WireError>(&future.payload)
            .unwrap()
            .message
            .contains("unsupported protocol version 99")
    );
    let big = s
        .nats
        .request(subjects.step("g", "v1", "s"), Bytes::from(garbage[4].1.clone()))
        .await
        .unwrap();
    assert!(
        decode::<WireError>(&big.payload)
            .unwrap()
            .message
            .contains("exceeds the limit of 4096 bytes")
    );
    // Run and status subjects: the coordinator rejects each with a reason.
    for subject in [subjects.run_requests("g"), subjects.status_requests()] {
        for (what, bytes) in &garbage[..4] {
            let answer = s.nats.request(subject.clone(), Bytes::from(bytes.clone())).await.unwrap();
            match decode::<orchestrix_proto::RunReply>(&answer.payload).unwrap() {
                orchestrix_proto::RunReply::Rejected { error, .. } => {
                    assert!(error.starts_with("bad "), "{what}: {error}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }
    // Values nested far past the codec's limit (a debug build's stack once
    // ran out before the limit was reached): refused on every subject.
    // (The worker here takes messages of 4 KiB at most.)
    for (subject, kind, levels) in [
        (subjects.step("g", "v1", "s"), "step.command", 1_300),
        (subjects.run_requests("g"), "run.request", 5_000),
        (subjects.status_requests(), "run.status", 5_000),
    ] {
        let deep = Bytes::from(deeply_nested(kind, levels));
        let answer = s.nats.request(subject, deep).await.unwrap();
        let text = match decode::<orchestrix_proto::RunReply>(&answer.payload) {
            Ok(orchestrix_proto::RunReply::Rejected { error, .. }) => error,
            _ => decode::<WireError>(&answer.payload).unwrap().message,
        };
        assert!(text.contains("depth limit exceeded"), "{kind}: {text}");
    }
    // A timeout the wire can say but no clock can (2^64 ms) is refused: it
    // once wrapped around to a deadline in the past.
    let forever = encode(&orchestrix_proto::RunRequest {
        timeout: Some(Duration::from_millis(u64::MAX)),
        wait: true,
        ..orchestrix_proto::RunRequest::new("g", Payload::nil())
    })
    .unwrap();
    let answer = s.nats.request(subjects.run_requests("g"), Bytes::from(forever)).await.unwrap();
    let orchestrix_proto::RunReply::Rejected { error, code, .. } = decode(&answer.payload).unwrap()
    else {
        panic!()
    };
    assert_eq!(code, "bad_request", "{error}");
    assert!(error.contains("over the longest allowed, 100 years"), "{error}");
    // A message of the wrong kind on the run subject is named as such.
    let wrong =
        encode(&orchestrix_proto::StatusRequest { run_id: Uuid::nil(), wait: false }).unwrap();
    let answer = s.nats.request(subjects.run_requests("g"), Bytes::from(wrong)).await.unwrap();
    let orchestrix_proto::RunReply::Rejected { error, .. } = decode(&answer.payload).unwrap()
    else {
        panic!()
    };
    assert!(error.contains("expected a `run.request` message, got `run.status`"), "{error}");
    // The coordinator's reply subject takes garbage without a word, and without harm.
    for (_, bytes) in &garbage {
        s.nats.publish(subjects.replies("anyone"), Bytes::from(bytes.clone())).await.unwrap();
    }
    // Unknown flows and runs are clear errors to the caller.
    let err = s.client.run("nope", &1u32, RunOptions::new()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::UnknownFlow), "{err}");
    assert!(err.to_string().contains("no coordinator serves flow `nope`"), "{err}");
    // A request on a served flow's subject that names another flow is
    // refused: permissions grant subjects, so the body may not pick the flow.
    let other = encode(&orchestrix_proto::RunRequest::new("nope", Payload::nil())).unwrap();
    let answer = s.nats.request(subjects.run_requests("g"), Bytes::from(other)).await.unwrap();
    let orchestrix_proto::RunReply::Rejected { error, code, .. } = decode(&answer.payload).unwrap()
    else {
        panic!()
    };
    assert_eq!(code, "bad_request", "{error}");
    assert!(
        error.starts_with("the request names flow `nope` but was sent on `orchestrix.run.g`"),
        "{error}"
    );
    let err = s.client.status(Uuid::nil().into()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::UnknownRun), "{err}");
    assert!(err.to_string().starts_with("unknown run"), "{err}");
    // And both keep serving.
    let report = s.client.run("g", &1u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed);
    w.shutdown().await;
}

/// An envelope of `kind` whose body holds, in a field nobody knows, maps
/// nested `levels` deep.
fn deeply_nested(kind: &str, levels: usize) -> Vec<u8> {
    let mut msg = vec![0x83, 0xa1, b'v', orchestrix_proto::PROTOCOL_VERSION as u8, 0xa4];
    msg.extend_from_slice(b"kind");
    msg.push(0xa0 | kind.len() as u8);
    msg.extend_from_slice(kind.as_bytes());
    msg.extend_from_slice(&[0xa4, b'b', b'o', b'd', b'y', 0x81, 0xa5]);
    msg.extend_from_slice(b"extra");
    for _ in 0..levels {
        msg.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    msg.push(0xc0);
    msg
}

fn rmp_like<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Any self-describing map encoding the codec reads: MessagePack via a payload.
    Payload::encode(v).unwrap().as_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_finish_when_nats_restarts_mid_run() {
    let mut server = NatsServer::start();
    let toml = "[[flow]]\nname = \"long\"\n[[flow.step]]\nname = \"wait\"\nretries = 5\nretry_delay_ms = 100\n[[flow.step]]\nname = \"after\"\nretries = 5\nretry_delay_ms = 100\n";
    let s = setup(&server, toml, SECS, SECS).await;
    let entered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let e = entered.clone();
    let w = worker(&server)
        .steps::<u32>("long", move |f| {
            let e = e.clone();
            f.step("wait", move |_: StepContext<u32>| {
                e.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    Ok(())
                }
            })
            .step("after", |ctx| async move { Ok(ctx.input) })
        })
        .start()
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..10u32 {
        handles.push(s.coordinator.start("long", &i, RunOptions::new()).await.unwrap());
    }
    eventually(10 * SECS, "all runs inside their first step", || {
        entered.load(std::sync::atomic::Ordering::SeqCst) >= 10
    })
    .await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    let reports: Vec<RunReport> =
        futures::future::join_all(handles.into_iter().map(|h| async move {
            tokio::time::timeout(60 * SECS, h.report()).await.unwrap().unwrap()
        }))
        .await;
    for r in &reports {
        assert_eq!(r.status, RunStatus::Completed, "{r}");
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_events_are_published_in_order() {
    use orchestrix_proto::{EventKind, RunEvent};

    let server = NatsServer::start();
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"ev\"\n[[flow.step]]\nname = \"a\"\ncompensable = true\n[[flow.step]]\nname = \"b\"\nretries = 1\nretry_delay_ms = 10\n";
    // The node publishes run events (its default).
    let node = Node::builder()
        .store(NodeStore::Memory)
        .flows(flowfile::parse(toml).unwrap())
        .registry(false)
        .start(nats.clone())
        .await
        .unwrap();
    let coordinator = node.coordinator();
    let w = worker(&server)
        .steps::<()>("ev", |f| {
            f.step("a", |_: StepContext<()>| async { Ok(()) })
                .compensate("a", |_| async { Ok(()) })
                .step("b", |_| async { Err::<(), _>(StepError::retryable("no")) })
        })
        .start()
        .await
        .unwrap();
    let mut events = nats.subscribe(Subjects::default().all_events()).await.unwrap();
    orchestrix_worker::sync(&nats).await;
    let report = coordinator.run("ev", &(), RunOptions::new()).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(5 * SECS, events.next()).await.unwrap().unwrap();
        let ev: RunEvent = decode(&msg.payload).unwrap();
        assert_eq!(ev.run_id, report.run_id);
        assert_eq!(msg.subject.as_str(), Subjects::default().events(&report.run_id.as_uuid()));
        let end = matches!(ev.event, EventKind::RunEnded { .. });
        seen.push(orchestrix_coordinator::nats::describe(&ev.event));
        if end {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "run started",
            "a: attempt 1 sent",
            "a: completed after 1 attempt(s)",
            "b: attempt 1 sent",
            "b: attempt 1 failed (no); retry in 10 ms",
            "b: attempt 2 sent",
            "b: failed for good (no); rolling back",
            "a: compensating",
            "a: compensated",
            "run ended: failed",
        ]
    );
    w.shutdown().await;
}
