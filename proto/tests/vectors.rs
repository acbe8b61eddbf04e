//! Golden vectors of protocol v2: for every message kind and every variant of
//! its unions, the exact bytes this implementation sends
//! (`vectors/<name>.msgpack`) and their MessagePack data model as JSON
//! (`vectors/<name>.json`, a `bin` written as `{"$bin": "<hex>"}`); for flow
//! definitions, the bytes their version hash is taken over and the version.
//!
//! Every SDK's tests decode each vector and compare it with its JSON, and
//! encode it back. Here the bytes must be what the Rust types produce today,
//! each vector must decode into its type and re-encode to the same bytes, and
//! each JSON model must validate against the schema in
//! `docs/protocol/schema.json` — whose unions and maps are closed, so a field
//! the Rust types add, drop or rename without the schema fails this test.
//!
//! After a deliberate change: `ORCHESTRIX_BLESS=1 cargo test -p
//! orchestrix-proto --test vectors` rewrites the files; review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrix_proto::*;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};
use uuid::Uuid;

const RUN: Uuid = Uuid::from_u128(0x0190_a5e4_7b1c_7d2e_8f00_1a2b_3c4d_5e6f);
const CMD: Uuid = Uuid::from_u128(0x0190_a5e4_7b1d_7000_8000_0000_0000_0001);
const T0: u64 = 1_700_000_000_000;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol/schema.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The MessagePack data model as JSON: `bin` becomes `{"$bin": hex}`.
struct Model(Value);

impl<'de> Deserialize<'de> for Model {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ModelVisitor)
    }
}

struct ModelVisitor;

impl<'de> Visitor<'de> for ModelVisitor {
    type Value = Model;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Model, E> {
        Ok(Model(json!(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Model, E> {
        Ok(Model(json!(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Model, E> {
        Ok(Model(json!(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Model, E> {
        Ok(Model(json!(v)))
    }
    fn visit_f32<E>(self, v: f32) -> Result<Model, E> {
        Ok(Model(json!(f64::from(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Model, E> {
        Ok(Model(json!(v)))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Model, E> {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Model(json!({ "$bin": hex })))
    }
    fn visit_unit<E>(self) -> Result<Model, E> {
        Ok(Model(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Model, E> {
        Ok(Model(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Model, D::Error> {
        Model::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Model, A::Error> {
        let mut out = Vec::new();
        while let Some(Model(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Model(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Model, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, Model(v))) = map.next_entry::<String, Model>()? {
            if out.insert(k.clone(), v).is_some() {
                return Err(de::Error::custom(format!("duplicate key {k}")));
            }
        }
        Ok(Model(Value::Object(out)))
    }
}

fn model(bytes: &[u8]) -> Value {
    rmp_serde::from_slice::<Model>(bytes).unwrap().0
}

type Check = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// A vector: its bytes, and how to decode and re-encode them with its type.
fn vector<M: Message + PartialEq + fmt::Debug + 'static>(
    out: &mut BTreeMap<String, (Vec<u8>, Check)>,
    name: &str,
    msg: M,
) {
    let bytes = encode(&msg).unwrap();
    let check: Check = Box::new(move |b: &[u8]| {
        let back: M = decode(b).unwrap();
        assert_eq!(back, msg);
        encode(&back).unwrap()
    });
    assert!(out.insert(name.to_owned(), (bytes, check)).is_none(), "{name} twice");
}

fn report(status: RunStatus) -> RunReport {
    let failed = status == RunStatus::Failed;
    RunReport {
        run_id: RUN.into(),
        flow: "payment-flow".into(),
        version: Some("6a2f1c0b9d8e7f61".into()),
        status,
        duration: Duration::from_millis(3012),
        started_at: Some(time::from_unix_ms(T0)),
        error: failed.then(|| "Payment declined: limit exceeded".into()),
        failed_step: failed.then(|| "process-payment".into()),
        steps: vec![
            StepReport {
                name: "reserve-stock".into(),
                status: if failed { StepStatus::Compensated } else { StepStatus::Completed },
                attempts: 1,
                error: None,
                output: Some(Payload::encode(&json!({"reservation": "r-1"})).unwrap()),
                started_at: Some(time::from_unix_ms(T0 + 1)),
                duration: Some(Duration::from_millis(2)),
                compensation: failed.then_some(CompensationReport {
                    attempts: 1,
                    error: None,
                    duration: Some(Duration::from_millis(1)),
                }),
                waiting: None,
                group: Some("reserve".into()),
            },
            StepReport {
                name: "process-payment".into(),
                status: if failed { StepStatus::Failed } else { StepStatus::Completed },
                attempts: if failed { 4 } else { 1 },
                error: failed.then(|| "Payment declined: limit exceeded".into()),
                output: (!failed).then(Payload::nil),
                started_at: Some(time::from_unix_ms(T0 + 3)),
                duration: Some(Duration::from_millis(3006)),
                compensation: None,
                waiting: Some("step limit of 2 reached".into()),
                group: None,
            },
        ],
        late: if failed { vec!["a late answer".into()] } else { Vec::new() },
        actions: if failed {
            vec![OperatorAction {
                action: ControlAction::Resume,
                by: "ops@host".into(),
                reason: Some("card service back".into()),
                at: time::from_unix_ms(T0 + 2000),
            }]
        } else {
            Vec::new()
        },
        paused: failed.then(|| PauseReport {
            step: "process-payment".into(),
            kind: CommandKind::Execute,
            since: time::from_unix_ms(T0 + 1000),
            until: Some(time::from_unix_ms(T0 + 61_000)),
        }),
    }
}

/// The quick start's flow, as every SDK must define it.
fn payment_flow() -> FlowDef {
    FlowDef::new("payment-flow")
        .step(StepDef::new("reserve-stock").compensable())
        .step(
            StepDef::new("process-payment")
                .retry(RetryPolicy::new().retries(3).retry_delay(Duration::from_millis(1000))),
        )
        .step(StepDef::new("send-email"))
}

/// The conformance kit's flow (see conformance/README.md).
fn conformance_flow() -> FlowDef {
    FlowDef::new("conformance")
        .step(StepDef::new("record").compensable())
        .step(
            StepDef::new("flaky")
                .retry(RetryPolicy::new().retries(3).retry_delay(Duration::from_millis(200)))
                .compensable(),
        )
        .step(StepDef::new("slow"))
        .step(StepDef::new("bounded").timeout(Duration::from_millis(1000)))
        .step(StepDef::new("decide"))
}

/// Every optional field set.
fn everything_flow() -> FlowDef {
    FlowDef::new("everything")
        .step(
            StepDef::new("a")
                .retry(
                    RetryPolicy::new()
                        .retries(5)
                        .retry_delay(Duration::from_millis(250))
                        .backoff(2.0)
                        .max_delay(Duration::from_secs(30))
                        .jitter(0.25)
                        .max_duration(Duration::from_secs(600)),
                )
                .timeout(Duration::from_secs(10))
                .compensable()
                .compensation_retry(RetryPolicy::new().retries(7))
                .compensation_timeout(Duration::from_secs(20))
                .on_unknown(OnUnknown::Retry)
                .on_exhausted(OnExhausted::Pause)
                .compensation_on_exhausted(OnExhausted::Pause)
                .pause_timeout(Duration::from_secs(3600)),
        )
        .step(StepDef::new("b").group("g").max_in_flight(2))
        .step(StepDef::new("c").group("g"))
        .concurrency_per_key(3)
        .input_schema(r#"{"type":"object"}"#)
}

fn messages() -> BTreeMap<String, (Vec<u8>, Check)> {
    let mut v = BTreeMap::new();
    let m = &mut v;
    let input =
        Payload::encode(&json!({"orderId": "order_1", "amount": 50, "userId": "user_A"})).unwrap();
    vector(
        m,
        "step.command",
        StepCommand {
            command_id: CMD,
            run_id: RUN,
            flow: "payment-flow".into(),
            version: "6a2f1c0b9d8e7f61".into(),
            step: "process-payment".into(),
            step_index: 1,
            kind: CommandKind::Execute,
            attempt: 2,
            input: input.clone(),
            outputs: vec![StepOutput {
                step: "reserve-stock".into(),
                output: Payload::encode(&json!({"reservation": "r-1"})).unwrap(),
            }],
            timeout: Some(Duration::from_millis(5000)),
            start_by_ms: Some(T0 + 2500),
            deadline_ms: Some(T0 + 5000),
            acks: true,
            sampled: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        },
    );
    vector(
        m,
        "step.command-minimal",
        StepCommand {
            command_id: CMD,
            run_id: RUN,
            flow: "payment-flow".into(),
            version: "v1".into(),
            step: "reserve-stock".into(),
            step_index: 0,
            kind: CommandKind::Compensate,
            attempt: 1,
            input: Payload::nil(),
            outputs: Vec::new(),
            timeout: None,
            start_by_ms: None,
            deadline_ms: None,
            acks: false,
            sampled: Some(false),
            traceparent: None,
        },
    );
    let ack =
        Ack { command_id: CMD, run_id: RUN, attempt: 2, worker: "payments-7f9c@host-1".into() };
    vector(m, "step.ack", ack.clone());
    vector(
        m,
        "step.acks",
        Acks {
            worker: ack.worker.clone(),
            commands: vec![
                Acked { command_id: CMD, run_id: RUN, attempt: 2 },
                Acked {
                    command_id: Uuid::from_u128(0x0190_a5e4_7b1d_7000_8000_0000_0000_0002),
                    run_id: Uuid::from_u128(0x0190_a5e4_7b1c_7d2e_8f00_1a2b_3c4d_5e70),
                    attempt: 1,
                },
            ],
        },
    );
    vector(
        m,
        "step.heartbeat",
        Heartbeat { command_id: CMD, run_id: RUN, attempt: 2, worker: ack.worker.clone() },
    );
    let outcome = |result| StepOutcome {
        command_id: CMD,
        run_id: RUN,
        attempt: 2,
        kind: CommandKind::Execute,
        result,
    };
    vector(
        m,
        "step.outcome-completed",
        outcome(OutcomeResult::Completed {
            output: Payload::encode(&json!({"charge": 50})).unwrap(),
        }),
    );
    vector(
        m,
        "step.outcome-completed-nil",
        outcome(OutcomeResult::Completed { output: Payload::nil() }),
    );
    vector(
        m,
        "step.outcome-failed",
        outcome(OutcomeResult::Failed(StepFailure::new("Payment declined: limit exceeded", true))),
    );
    vector(
        m,
        "step.outcome-failed-permanent",
        outcome(OutcomeResult::Failed(StepFailure::new("card stolen", false))),
    );
    vector(
        m,
        "step.outcome-maybe-done",
        outcome(OutcomeResult::Failed(StepFailure::maybe_done("stopped at its deadline"))),
    );
    vector(m, "step.cancel", StepCancel { command_id: CMD, run_id: RUN, attempt: 2 });
    vector(
        m,
        "error",
        WireError {
            message: "command expired before it could start".into(),
            code: WireError::CODE_EXPIRED.into(),
            command_id: Some(CMD),
            run_id: Some(RUN),
        },
    );
    vector(m, "error-malformed", WireError::malformed("expected a `step.command` message"));
    vector(
        m,
        "run.request",
        RunRequest {
            flow: "payment-flow".into(),
            version: Some("6a2f1c0b9d8e7f61".into()),
            input: input.clone(),
            key: Some("payment:order_1".into()),
            ttl: Some(Duration::from_secs(3600)),
            timeout: Some(Duration::from_secs(60)),
            wait: true,
            start_by_ms: Some(T0 + 5000),
            concurrency_key: Some("account:42".into()),
        },
    );
    vector(m, "run.request-minimal", RunRequest::new("payment-flow", input));
    vector(m, "run.status", StatusRequest { run_id: RUN, wait: true });
    vector(
        m,
        "run.list",
        ListRequest {
            status: Some(RunStatus::CompensationFailed),
            flow: Some("payment-flow".into()),
            limit: 20,
            before: Some(RUN),
        },
    );
    vector(
        m,
        "run.control",
        ControlRequest {
            run_id: RUN,
            action: ControlAction::Cancel,
            by: "ops@host".into(),
            reason: Some("customer asked".into()),
        },
    );
    vector(m, "run.reply-accepted", RunReply::Accepted { run_id: RUN, duplicate: true });
    vector(m, "run.reply-report", RunReply::Report(Box::new(report(RunStatus::Completed))));
    vector(m, "run.reply-report-failed", RunReply::Report(Box::new(report(RunStatus::Failed))));
    vector(m, "run.reply-list", RunReply::List(vec![report(RunStatus::Completed)]));
    vector(
        m,
        "run.reply-rejected",
        RunReply::rejected(RunReply::CODE_UNKNOWN_FLOW, "no flow `nope` is served"),
    );
    let events = [
        EventKind::RunStarted,
        EventKind::StepStarted {
            step: "reserve-stock".into(),
            attempt: 1,
            group: Some("g".into()),
        },
        EventKind::Retry {
            step: "process-payment".into(),
            kind: CommandKind::Execute,
            attempt: 1,
            error: "timeout".into(),
            delay_ms: 1000,
        },
        EventKind::StepCompleted { step: "reserve-stock".into(), attempt: 1 },
        EventKind::StepUnknown {
            step: "process-payment".into(),
            kind: CommandKind::Execute,
            attempt: 2,
            reason: "worker went silent".into(),
        },
        EventKind::StepFailed { step: "process-payment".into(), error: "declined".into() },
        EventKind::CompensationStarted { step: "reserve-stock".into(), group: Some("g".into()) },
        EventKind::Compensated { step: "reserve-stock".into() },
        EventKind::CompensationFailed {
            step: "reserve-stock".into(),
            error: "stock service down".into(),
        },
        EventKind::RunPaused {
            step: "process-payment".into(),
            kind: CommandKind::Execute,
            error: "retries exhausted".into(),
        },
        EventKind::Operator { action: ControlAction::Resume, by: "ops@host".into() },
        EventKind::RunCancelled { by: "ops@host".into(), reason: Some("customer asked".into()) },
        EventKind::RunEnded { report: Box::new(report(RunStatus::Completed)) },
    ];
    for event in events {
        let name = format!("run.event-{}", event.type_name());
        vector(m, &name, RunEvent { run_id: RUN, flow: "payment-flow".into(), at_ms: T0, event });
    }
    let def = payment_flow();
    vector(
        m,
        "flow.registration",
        FlowRegistration {
            version: def.version(),
            flow: def,
            registered_at_ms: T0,
            registered_by: "payments-7f9c@host-1".into(),
        },
    );
    vector(
        m,
        "worker.presence",
        WorkerPresence {
            worker: "payments-7f9c@host-1".into(),
            host: "host-1".into(),
            started_at_ms: T0,
            flows: vec![
                ServedFlow {
                    flow: "payment-flow".into(),
                    version: Some("6a2f1c0b9d8e7f61".into()),
                    steps: vec![Arc::from("reserve-stock"), Arc::from("process-payment")],
                },
                ServedFlow { flow: "conformance".into(), version: None, steps: Vec::new() },
            ],
        },
    );
    v
}

fn flows() -> Vec<(&'static str, FlowDef)> {
    vec![
        ("payment-flow", payment_flow()),
        ("conformance", conformance_flow()),
        ("everything", everything_flow()),
        ("labelled", payment_flow().with_version("2026-11-27")),
    ]
}

fn bless() -> bool {
    std::env::var_os("ORCHESTRIX_BLESS").is_some()
}

fn check_file(path: &Path, want: &[u8]) {
    if bless() {
        std::fs::write(path, want).unwrap();
        return;
    }
    let have = std::fs::read(path).unwrap_or_else(|e| {
        panic!("{}: {e} (ORCHESTRIX_BLESS=1 writes the vectors)", path.display())
    });
    assert!(
        have == want,
        "{} differs from what the Rust types produce now; if the change is deliberate, rerun with ORCHESTRIX_BLESS=1 and review the diff",
        path.display()
    );
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s.into_bytes()
}

#[test]
fn every_message_matches_its_vector_and_its_schema() {
    let schema = schema();
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    let msgs = messages();
    for (name, (bytes, check)) in &msgs {
        check_file(&dir.join(format!("{name}.msgpack")), bytes);
        let model = model(bytes);
        check_file(&dir.join(format!("{name}.json")), &pretty(&model));
        assert_eq!(&check(bytes), bytes, "{name} does not re-encode to the same bytes");
        let kind = model["kind"].as_str().unwrap();
        let errors = violations(&schema, &format!("message-{kind}"), &model);
        assert!(errors.is_empty(), "{name} does not match the schema of `{kind}`: {errors:#?}");
        // The schema of every message (a `oneOf` over the kinds) takes it too.
        let any = jsonschema::validator_for(&schema).unwrap();
        assert!(any.is_valid(&model), "{name} does not match the schema of any message");
    }
    // No stale vector of a message that is gone.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let stem = file.rsplit_once('.').map(|(s, _)| s).unwrap_or(&file);
        let known = msgs.contains_key(stem) || stem.starts_with("flow-");
        assert!(known, "{file} is not a vector this test makes");
    }
}

/// What is wrong with `value` as one definition of the schema.
fn violations(schema: &Value, def: &str, value: &Value) -> Vec<String> {
    assert!(schema["$defs"][def].is_object(), "docs/protocol/schema.json has no `{def}`");
    let one = json!({
        "$schema": schema["$schema"],
        "$defs": schema["$defs"],
        "$ref": format!("#/$defs/{def}"),
    });
    let validator = jsonschema::validator_for(&one).unwrap();
    validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect()
}

#[test]
fn every_flow_matches_its_vector_and_version() {
    let schema = schema();
    let dir = dir();
    for (name, def) in flows() {
        def.validate().unwrap();
        let bytes = rmp_serde::to_vec_named(&def).unwrap();
        check_file(&dir.join(format!("flow-{name}.msgpack")), &bytes);
        let model = model(&bytes);
        let errors = violations(&schema, "flowDef", &model);
        assert!(errors.is_empty(), "flow {name}: {errors:#?}");
        let version = def.version();
        check_file(
            &dir.join(format!("flow-{name}.json")),
            &pretty(&json!({"version": &*version, "definition": model})),
        );
        let back: FlowDef = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.version(), version);
    }
}

#[test]
fn what_the_schema_refuses_the_decoder_refuses_too() {
    // A v1 body (binary ids, snake_case keys, externally tagged result).
    let v1 = rmp_serde::to_vec_named(&json!({
        "v": 2, "kind": "step.outcome",
        "body": {"command_id": CMD.to_string(), "run_id": RUN.to_string(), "attempt": 1,
                 "kind": "execute", "result": {"completed": {"output": null}}}
    }))
    .unwrap();
    assert!(decode::<StepOutcome>(&v1).is_err());
    // A `str` where a user value is expected.
    let str_input = rmp_serde::to_vec_named(&json!({
        "v": 2, "kind": "step.outcome",
        "body": {"commandId": CMD.to_string(), "runId": RUN.to_string(), "attempt": 1,
                 "kind": "execute", "result": {"type": "completed", "output": "ok"}}
    }))
    .unwrap();
    let err = decode::<StepOutcome>(&str_input).unwrap_err().to_string();
    assert!(err.contains("bin"), "{err}");
}

/// The page of each message in `docs/protocol/messages/`, rendered from the
/// schema and the vectors, so that the spec, the schema and the code cannot
/// drift apart.
#[test]
fn every_message_has_its_spec_page() {
    let schema = schema();
    let defs = schema["$defs"].as_object().unwrap();
    let pages = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol/messages");
    std::fs::create_dir_all(&pages).unwrap();
    let msgs = messages();
    let mut shared = Vec::new();
    let mut index = String::from(
        "# Messages of protocol v2\n\nGenerated from [`schema.json`](../schema.json) and the golden vectors by \
         `proto/tests/vectors.rs` (`ORCHESTRIX_BLESS=1` rewrites it). Types are MessagePack's; \
         every map key is camelCase, unknown keys are ignored, and an optional field may be \
         absent or nil. See [the protocol](../README.md) for the rules.\n\n| kind | page |\n| --- | --- |\n",
    );
    for (def, body) in defs {
        let Some(kind) = def.strip_prefix("message-") else { continue };
        let body_ref = body["properties"]["body"]["$ref"].as_str().unwrap();
        let body_def = body_ref.rsplit('/').next().unwrap();
        let mut page = format!("# `{kind}`\n\n");
        page += &format!(
            "Envelope: `{{\"v\": 2, \"kind\": \"{kind}\", \"body\": …}}`. [All messages](README.md) · [shared types](types.md) · [rules](../README.md)\n\n"
        );
        render_def(&mut page, defs, body_def, "Body", &mut shared);
        for (name, (bytes, _)) in &msgs {
            let model = model(bytes);
            if model["kind"] != kind {
                continue;
            }
            page += &format!(
                "\n## Example: `{name}`\n\n```json\n{}\n```\n\n",
                String::from_utf8(pretty(&model)).unwrap().trim_end()
            );
            page += &format!(
                "Bytes ([`proto/tests/vectors/{name}.msgpack`](../../../proto/tests/vectors/{name}.msgpack)), {} bytes.\n",
                bytes.len()
            );
        }
        check_file(&pages.join(format!("{kind}.md")), page.as_bytes());
        index += &format!("| `{kind}` | [{kind}]({kind}.md) |\n");
    }
    check_file(&pages.join("README.md"), index.as_bytes());
    let mut types = String::from(
        "# Shared types of protocol v2\n\nGenerated from [`schema.json`](../schema.json); see [the messages](README.md).\n",
    );
    let mut done = std::collections::BTreeSet::new();
    while let Some(def) = shared.pop() {
        if !done.insert(def.clone()) {
            continue;
        }
        let mut more = Vec::new();
        render_def(&mut types, defs, &def, &def, &mut more);
        shared.extend(more);
    }
    check_file(&pages.join("types.md"), types.as_bytes());
}

/// A definition as a section: a field table for a map, one table per variant
/// for a union.
fn render_def(
    out: &mut String,
    defs: &serde_json::Map<String, Value>,
    def: &str,
    title: &str,
    shared: &mut Vec<String>,
) {
    let d = &defs[def];
    out.push_str(&format!("\n## {title}\n\n"));
    if let Some(desc) = d["description"].as_str() {
        out.push_str(desc);
        out.push_str("\n\n");
    }
    if let Some(variants) = d["oneOf"].as_array() {
        out.push_str("A union: a map whose `type` names the variant.\n");
        for v in variants {
            let vdef = v["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
            let ty = defs[vdef]["properties"]["type"]["const"].as_str().unwrap();
            out.push_str(&format!("\n### `type: \"{ty}\"`\n\n"));
            fields(out, defs, vdef, shared);
        }
        return;
    }
    fields(out, defs, def, shared);
}

fn fields(
    out: &mut String,
    defs: &serde_json::Map<String, Value>,
    def: &str,
    shared: &mut Vec<String>,
) {
    let d = &defs[def];
    let required: Vec<&str> =
        d["required"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    out.push_str("| key | type | required | meaning |\n| --- | --- | --- | --- |\n");
    for (key, prop) in d["properties"].as_object().unwrap() {
        let desc = prop["description"].as_str().unwrap_or("");
        let req = if required.contains(&key.as_str()) { "yes" } else { "no" };
        out.push_str(&format!("| `{key}` | {} | {req} | {desc} |\n", type_of(prop, defs, shared)));
    }
}

fn type_of(p: &Value, defs: &serde_json::Map<String, Value>, shared: &mut Vec<String>) -> String {
    if let Some(r) = p["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return match name {
            "id" => "str (UUID text)".into(),
            "ms" => "uint (ms)".into(),
            "u32" => "uint (u32)".into(),
            "name" => "str (name: `A–Z a–z 0–9 - _`, 1–128)".into(),
            "payload" => "bin (one MessagePack value)".into(),
            _ if defs[name]["enum"].is_array() => type_of(&defs[name], defs, shared),
            _ => {
                shared.push(name.to_owned());
                format!("map [{name}](types.md#{})", name.to_lowercase())
            }
        };
    }
    if let Some(any) = p["anyOf"].as_array() {
        return format!("{} or nil", type_of(&any[0], defs, shared));
    }
    if let Some(c) = p["const"].as_str() {
        return format!("str `\"{c}\"`");
    }
    if let Some(c) = p["const"].as_u64() {
        return format!("uint `{c}`");
    }
    if let Some(e) = p["enum"].as_array() {
        let vals: Vec<String> = e.iter().map(|v| format!("`{}`", v.as_str().unwrap())).collect();
        return format!("str: {}", vals.join(" / "));
    }
    match p["type"].as_str() {
        Some("array") => format!("array of {}", type_of(&p["items"], defs, shared)),
        Some("string") => "str".into(),
        Some("boolean") => "bool".into(),
        Some("integer") => "uint".into(),
        Some("number") => "float64".into(),
        Some("object") => "map".into(),
        _ => panic!("no rendering for {p}"),
    }
}
