//! The wire protocol's document names every message and every subject the
//! code uses: a kind or subject added without documenting it fails here.

use orchestrix_proto::{
    Ack, Acks, ControlRequest, FlowRegistration, Heartbeat, ListRequest, Message, RunEvent,
    RunReply, RunRequest, StatusRequest, StepCancel, StepCommand, StepOutcome, Subjects, WireError,
    WorkerPresence,
};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol/README.md"));

#[test]
fn every_message_kind_is_documented() {
    let kinds = [
        StepCommand::KIND,
        Ack::KIND,
        Acks::KIND,
        Heartbeat::KIND,
        StepOutcome::KIND,
        StepCancel::KIND,
        RunRequest::KIND,
        StatusRequest::KIND,
        ListRequest::KIND,
        RunReply::KIND,
        RunEvent::KIND,
        ControlRequest::KIND,
        FlowRegistration::KIND,
        WorkerPresence::KIND,
        WireError::KIND,
    ];
    let missing: Vec<_> = kinds.iter().filter(|k| !DOC.contains(&format!("`{k}`"))).collect();
    assert!(missing.is_empty(), "message kinds missing from docs/protocol/README.md: {missing:?}");
}

#[test]
fn every_subject_is_documented() {
    // Each subject, built by the code with placeholder names, in the
    // document's notation.
    let s = Subjects::new("p").unwrap();
    let id = uuid::Uuid::nil();
    let subjects = [
        s.step("F", "V", "S"),
        s.step_any_version("F", "S"),
        s.inquiries("F", "S"),
        s.run_requests("F"),
        s.status_requests(),
        s.list_requests(),
        s.control_requests(),
        s.replies("C"),
        s.events(&id),
    ];
    let notation = |subject: &str| {
        subject
            .replacen("p.", "{p}.", 1)
            .replace(".F", ".{flow}")
            .replace(".V.", ".{version}.")
            .replace(".S", ".{step}")
            .replace(".C", ".{coordinator}")
            .replace(&id.to_string(), "{run_id}")
    };
    let missing: Vec<String> =
        subjects.iter().map(|s| notation(s)).filter(|n| !DOC.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "subjects missing from docs/protocol/README.md: {missing:?}");
}
