//! Round trips and bad input for every wire message.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use orchestrix_proto::*;
use proptest::prelude::*;
use uuid::Uuid;

fn command(attempt: u32, input: Vec<u8>) -> StepCommand {
    StepCommand {
        command_id: Uuid::new_v4(),
        run_id: Uuid::now_v7(),
        flow: Arc::from("payment-flow"),
        step: Arc::from("process-payment"),
        step_index: 1,
        kind: CommandKind::Execute,
        attempt,
        version: "v1".into(),
        input: Payload::encode(&input).unwrap(),
        outputs: vec![StepOutput { step: Arc::from("reserve-stock"), output: Payload::nil() }],
        timeout: Some(Duration::from_millis(1500)),
        start_by_ms: Some(1_800_000_000_000),
        deadline_ms: None,
        acks: false,
        sampled: None,
        traceparent: None,
    }
}

fn report() -> RunReport {
    RunReport {
        late: Vec::new(),
        paused: None,
        actions: vec![orchestrix_proto::OperatorAction {
            action: orchestrix_proto::ControlAction::Cancel,
            by: "ops@host".into(),
            reason: Some("customer asked".into()),
            at: time::from_unix_ms(1_700_000_001_000),
        }],
        run_id: Uuid::now_v7().into(),
        flow: "payment-flow".into(),
        version: Some("v1".into()),
        status: RunStatus::Failed,
        duration: Duration::from_millis(3004),
        started_at: Some(time::from_unix_ms(1_700_000_000_000)),
        error: Some("Payment declined: limit exceeded".into()),
        failed_step: Some("process-payment".into()),
        steps: vec![
            StepReport {
                waiting: None,
                group: Some("reserve".into()),
                name: "reserve-stock".into(),
                status: StepStatus::Compensated,
                attempts: 1,
                error: None,
                output: Some(Payload::encode(&serde_json::json!({"reservation": 7})).unwrap()),
                started_at: Some(SystemTime::UNIX_EPOCH),
                duration: Some(Duration::from_millis(1)),
                compensation: Some(CompensationReport {
                    attempts: 1,
                    error: None,
                    duration: Some(Duration::ZERO),
                }),
            },
            StepReport {
                waiting: None,
                group: None,
                name: "process-payment".into(),
                status: StepStatus::Failed,
                attempts: 4,
                error: Some("Payment declined: limit exceeded".into()),
                output: None,
                started_at: None,
                duration: None,
                compensation: None,
            },
        ],
    }
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = encode(m).unwrap();
    assert_eq!(&decode::<M>(&bytes).unwrap(), m);
    assert_eq!(peek_kind(&bytes).unwrap(), (PROTOCOL_VERSION, M::KIND.to_owned()));
}

#[test]
fn every_message_round_trips() {
    let id = Uuid::new_v4();
    round_trip(&command(3, vec![1, 2, 3]));
    round_trip(&Ack { command_id: id, run_id: id, attempt: 1, worker: "w".into() });
    round_trip(&Heartbeat { command_id: id, run_id: id, attempt: 2, worker: "w".into() });
    round_trip(&StepOutcome {
        command_id: id,
        run_id: id,
        attempt: 1,
        kind: CommandKind::Compensate,
        result: OutcomeResult::Completed { output: Payload::encode(&42u32).unwrap() },
    });
    round_trip(&StepOutcome {
        command_id: id,
        run_id: id,
        attempt: 4,
        kind: CommandKind::Execute,
        result: OutcomeResult::Failed(StepFailure::new("boom", false)),
    });
    round_trip(&RunRequest {
        flow: "payment-flow".into(),
        version: Some("v2".into()),
        input: Payload::nil(),
        key: Some("payment:order_1".into()),
        ttl: Some(Duration::from_secs(3600)),
        timeout: None,
        wait: true,
        start_by_ms: None,
        concurrency_key: Some("account:42".into()),
    });
    round_trip(&StatusRequest { run_id: id, wait: true });
    round_trip(&RunReply::Accepted { run_id: id, duplicate: false });
    round_trip(&RunReply::Accepted { run_id: id, duplicate: true });
    round_trip(&RunReply::Report(Box::new(report())));
    round_trip(&RunReply::rejected(RunReply::CODE_UNKNOWN_FLOW, "unknown flow `x`"));
    round_trip(&RunReply::Rejected {
        error: "old".into(),
        retryable: false,
        code: RunReply::CODE_OTHER.into(),
    });
    round_trip(&RunReply::List(vec![report()]));
    round_trip(&ListRequest {
        status: Some(RunStatus::Failed),
        flow: None,
        limit: 5,
        before: None,
    });
    round_trip(&ListRequest { status: None, flow: None, limit: 5, before: Some(id) });
    for event in [
        EventKind::RunStarted,
        EventKind::Retry {
            step: "s".into(),
            kind: CommandKind::Compensate,
            attempt: 2,
            error: "e".into(),
            delay_ms: 100,
        },
        EventKind::RunEnded { report: Box::new(report()) },
    ] {
        round_trip(&RunEvent { run_id: id, flow: "f".into(), at_ms: 1, event });
    }
}

#[test]
fn report_json_uses_the_quick_start_names() {
    let original = report();
    let json = serde_json::to_value(&original).unwrap();
    assert_eq!(json["status"], "failed");
    assert_eq!(json["durationMs"], 3004);
    assert_eq!(json["failedStep"], "process-payment");
    assert_eq!(json["steps"][0]["name"], "reserve-stock");
    assert_eq!(json["steps"][0]["status"], "compensated");
    assert_eq!(json["steps"][0]["output"]["reservation"], 7);
    assert_eq!(json["steps"][1]["attempts"], 4);
    assert_eq!(json["steps"][1]["error"], "Payment declined: limit exceeded");
    let back: RunReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, original);
}

#[test]
fn oversized_messages_are_rejected_before_decoding() {
    let bytes = encode(&command(1, vec![0; 2048])).unwrap();
    let err = decode_with_limit::<StepCommand>(&bytes, 1024).unwrap_err();
    assert!(matches!(err, CodecError::TooLarge { limit: 1024, .. }), "{err}");
    let huge = vec![0u8; DEFAULT_MAX_MESSAGE_BYTES + 1];
    assert!(matches!(decode::<Ack>(&huge), Err(CodecError::TooLarge { .. })));
}

#[test]
fn another_version_is_named_as_such() {
    #[derive(serde::Serialize)]
    struct Future<'a> {
        v: u16,
        kind: &'a str,
        body: (u8, u8),
    }
    for v in [1, 3] {
        let bytes = rmp_serde::to_vec_named(&Future { v, kind: "step.ack", body: (1, 2) }).unwrap();
        let err = decode::<Ack>(&bytes).unwrap_err();
        assert!(
            matches!(err, CodecError::UnsupportedVersion { found, supported: 2 } if found == v),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("unsupported protocol version {v}")));
    }
}

#[test]
fn a_message_of_another_kind_is_named_as_such() {
    let id = Uuid::nil();
    let bytes =
        encode(&Ack { command_id: id, run_id: id, attempt: 1, worker: "w".into() }).unwrap();
    let err = decode::<StepOutcome>(&bytes).unwrap_err();
    assert!(matches!(err, CodecError::WrongKind { expected: "step.outcome", .. }), "{err}");
}

#[test]
fn truncated_messages_are_malformed_at_every_cut() {
    let bytes = encode(&command(2, vec![9; 40])).unwrap();
    for cut in 0..bytes.len() {
        let err = decode::<StepCommand>(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, CodecError::Malformed { .. }), "cut {cut}: {err}");
    }
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<StepCommand>(&bytes);
        let _ = decode::<StepOutcome>(&bytes);
        let _ = decode::<RunRequest>(&bytes);
        let _ = decode::<RunReply>(&bytes);
        let _ = peek_kind(&bytes);
    }

    #[test]
    fn commands_round_trip(attempt in 1u32..1000, input in proptest::collection::vec(any::<u8>(), 0..256)) {
        let cmd = command(attempt, input);
        let bytes = encode(&cmd).unwrap();
        prop_assert_eq!(decode::<StepCommand>(&bytes).unwrap(), cmd);
    }

    #[test]
    fn flipped_bytes_never_panic(seed in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = encode(&command(1, vec![1, 2, 3])).unwrap();
        for (i, b) in seed {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let _ = decode::<StepCommand>(&bytes);
    }
}

#[test]
fn the_ids_of_an_outcome_in_another_version_still_read() {
    // A v1 outcome: snake_case keys, 16-byte binary ids.
    #[derive(serde::Serialize)]
    struct Body {
        #[serde(with = "serde_bytes_16")]
        command_id: [u8; 16],
        #[serde(with = "serde_bytes_16")]
        run_id: [u8; 16],
        attempt: u32,
    }
    mod serde_bytes_16 {
        pub(super) fn serialize<S: serde::Serializer>(
            b: &[u8; 16],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }
    #[derive(serde::Serialize)]
    struct Env {
        v: u16,
        kind: &'static str,
        body: Body,
    }
    let (cmd, run) = (Uuid::new_v4(), Uuid::new_v4());
    let body = Body { command_id: *cmd.as_bytes(), run_id: *run.as_bytes(), attempt: 3 };
    let v1 = rmp_serde::to_vec_named(&Env { v: 1, kind: "step.outcome", body }).unwrap();
    assert!(matches!(decode::<StepOutcome>(&v1), Err(CodecError::UnsupportedVersion { .. })));
    let ids = decode_ids(&v1, StepOutcome::KIND, 1 << 20).unwrap();
    assert_eq!((ids.command_id, ids.run_id, ids.attempt), (cmd, run, 3));
    assert!(decode_ids(&v1, Ack::KIND, 1 << 20).is_none(), "another kind's ids are not read");
}

/// `levels` maps nested one in another: `{"a": {"a": … nil}}`.
fn nested(levels: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(levels * 3 + 1);
    for _ in 0..levels {
        bytes.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    bytes.push(0xc0);
    bytes
}

/// A message or payload nested deeper than `MAX_DEPTH` is refused as
/// malformed, on whatever thread decodes it. Before the limit was lowered
/// from MessagePack's 1,024, a few thousand levels overflowed the stack of
/// a debug build's thread (a crash, not an error); this test ran into it.
#[test]
fn values_nested_past_the_limit_are_malformed_not_a_crash() {
    let deep = nested(5_000);
    let payload = Payload::from_msgpack(deep.clone());
    let err = payload.validate().unwrap_err();
    assert!(err.to_string().contains("depth"), "{err}");
    assert!(payload.decode::<serde::de::IgnoredAny>().is_err());
    assert!(Payload::from_msgpack(nested(MAX_DEPTH - 2)).validate().is_ok());

    // A whole message: a run request whose body carries the deep value in
    // a field nobody knows (skipped, but still walked), and in its input.
    let mut msg = vec![0x83];
    msg.extend_from_slice(&[0xa1, b'v', PROTOCOL_VERSION as u8]);
    msg.extend_from_slice(&[0xa4, b'k', b'i', b'n', b'd', 0xab]);
    msg.extend_from_slice(b"run.request");
    msg.extend_from_slice(&[0xa4, b'b', b'o', b'd', b'y', 0x81, 0xa5]);
    msg.extend_from_slice(b"extra");
    msg.extend_from_slice(&deep);
    let err = decode::<RunRequest>(&msg).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { .. }), "{err}");
    assert!(peek_kind(&msg).is_ok(), "the header still reads");
}

/// Trace context is advisory: a `traceparent` that is not a string reads as
/// absent, and the command reads all the same.
#[test]
fn a_traceparent_that_is_not_a_string_reads_as_absent() {
    let marker = "@@@@@@@@@@@";
    let mut cmd = command(2, vec![1, 2, 3]);
    cmd.traceparent = Some(marker.into());
    let bytes = encode(&cmd).unwrap();
    let mut value = vec![0xa0 | marker.len() as u8];
    value.extend_from_slice(marker.as_bytes());
    let at = bytes.windows(value.len()).position(|w| w == value).unwrap();
    let with = |replacement: &[u8]| {
        let mut b = bytes[..at].to_vec();
        b.extend_from_slice(replacement);
        b.extend_from_slice(&bytes[at + value.len()..]);
        b
    };
    assert_eq!(decode::<StepCommand>(&with(&value)).unwrap(), cmd);
    cmd.traceparent = None;
    // An integer, an array, a map, bytes and a string that are not UTF-8, nil.
    let odd: [&[u8]; 6] = [
        &[0x2a],
        &[0x92, 0x01, 0x02],
        &[0x81, 0xa1, b'a', 0x01],
        &[0xc4, 0x01, 0xff],
        &[0xc0],
        &[0xa2, 0xff, 0xfe],
    ];
    for replacement in odd {
        let read = decode::<StepCommand>(&with(replacement));
        assert_eq!(read.as_ref().ok(), Some(&cmd), "{replacement:x?}: {read:?}");
    }
}
