//! The wire form of the protocol's unions: a flat map whose `type` key names
//! the variant, beside that variant's own fields (`{"type": "failed",
//! "message": …, "retryable": true}`), the shape a JavaScript or Python
//! programmer writes without thinking.
//!
//! Written by hand rather than with `#[serde(tag = "type")]`: serde buffers
//! internally tagged values in a format-neutral form that always claims to be
//! human-readable, which would turn a MessagePack `bin` payload into an
//! inline value. Each union goes through one borrowed "out" struct (every
//! field of every variant, absent unless set) and one owned "in" struct.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::messages::{EventKind, OutcomeResult, RunReply, StepFailure};
use crate::{CommandKind, ControlAction, Payload, RunReport};

fn unknown_type<E: serde::de::Error>(union: &str, ty: &str, expected: &[&str]) -> E {
    E::custom(format_args!("unknown {union} type `{ty}` (expected one of {})", expected.join(", ")))
}

fn need<T, E: serde::de::Error>(field: Option<T>, ty: &str, name: &'static str) -> Result<T, E> {
    field.ok_or_else(|| E::custom(format_args!("`{ty}` needs the field `{name}`")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retryable: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    maybe_done: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutcomeIn<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    output: Option<Payload>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retryable: Option<bool>,
    #[serde(default)]
    maybe_done: Option<bool>,
}

impl Serialize for OutcomeResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let out = match self {
            OutcomeResult::Completed { output } => OutcomeOut {
                ty: "completed",
                output: Some(output),
                message: None,
                retryable: None,
                maybe_done: false,
            },
            OutcomeResult::Failed(f) => OutcomeOut {
                ty: "failed",
                output: None,
                message: Some(&f.message),
                retryable: Some(f.retryable),
                maybe_done: f.maybe_done,
            },
        };
        out.serialize(s)
    }
}

impl<'de> Deserialize<'de> for OutcomeResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = OutcomeIn::deserialize(d)?;
        match &*w.ty {
            "completed" => {
                Ok(OutcomeResult::Completed { output: need(w.output, &w.ty, "output")? })
            }
            "failed" => Ok(OutcomeResult::Failed(StepFailure {
                message: need(w.message, &w.ty, "message")?,
                retryable: need(w.retryable, &w.ty, "retryable")?,
                maybe_done: w.maybe_done.unwrap_or(false),
            })),
            ty => Err(unknown_type("outcome", ty, &["completed", "failed"])),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplyOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::uuid_text::option")]
    run_id: Option<Uuid>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<&'a RunReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runs: Option<&'a [RunReport]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retryable: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplyIn<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, with = "crate::uuid_text::option")]
    run_id: Option<Uuid>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    report: Option<Box<RunReport>>,
    #[serde(default)]
    runs: Option<Vec<RunReport>>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    retryable: bool,
}

impl Serialize for RunReply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = ReplyOut {
            ty: "",
            run_id: None,
            duplicate: false,
            report: None,
            runs: None,
            error: None,
            code: None,
            retryable: None,
        };
        match self {
            RunReply::Accepted { run_id, duplicate } => {
                out.ty = "accepted";
                out.run_id = Some(*run_id);
                out.duplicate = *duplicate;
            }
            RunReply::Report(report) => {
                out.ty = "report";
                out.report = Some(report);
            }
            RunReply::List(runs) => {
                out.ty = "list";
                out.runs = Some(runs);
            }
            RunReply::Rejected { error, retryable, code } => {
                out.ty = "rejected";
                out.error = Some(error);
                out.code = Some(if code.is_empty() { RunReply::CODE_OTHER } else { code });
                out.retryable = Some(*retryable);
            }
        }
        out.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RunReply {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ReplyIn::deserialize(d)?;
        let ty = &*w.ty;
        match ty {
            "accepted" => Ok(RunReply::Accepted {
                run_id: need(w.run_id, ty, "runId")?,
                duplicate: w.duplicate,
            }),
            "report" => Ok(RunReply::Report(need(w.report, ty, "report")?)),
            "list" => Ok(RunReply::List(need(w.runs, ty, "runs")?)),
            "rejected" => Ok(RunReply::Rejected {
                error: need(w.error, ty, "error")?,
                retryable: w.retryable,
                code: w.code.unwrap_or_else(|| RunReply::CODE_OTHER.to_owned()),
            }),
            ty => Err(unknown_type("reply", ty, &["accepted", "report", "list", "rejected"])),
        }
    }
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct EventOut<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<CommandKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<ControlAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<&'a RunReport>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventIn<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    step: Option<String>,
    #[serde(default)]
    kind: Option<CommandKind>,
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    action: Option<ControlAction>,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    report: Option<Box<RunReport>>,
}

/// Every event type, as written in `type`.
const EVENT_TYPES: &[&str] = &[
    "run_started",
    "step_started",
    "retry",
    "step_completed",
    "step_unknown",
    "step_failed",
    "compensation_started",
    "compensated",
    "compensation_failed",
    "run_paused",
    "operator",
    "run_cancelled",
    "run_ended",
];

impl EventKind {
    /// The event's `type` on the wire (`step_started`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::RunStarted => "run_started",
            EventKind::StepStarted { .. } => "step_started",
            EventKind::Retry { .. } => "retry",
            EventKind::StepCompleted { .. } => "step_completed",
            EventKind::StepUnknown { .. } => "step_unknown",
            EventKind::StepFailed { .. } => "step_failed",
            EventKind::CompensationStarted { .. } => "compensation_started",
            EventKind::Compensated { .. } => "compensated",
            EventKind::CompensationFailed { .. } => "compensation_failed",
            EventKind::RunPaused { .. } => "run_paused",
            EventKind::Operator { .. } => "operator",
            EventKind::RunCancelled { .. } => "run_cancelled",
            EventKind::RunEnded { .. } => "run_ended",
        }
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut o = EventOut { ty: self.type_name(), ..EventOut::default() };
        match self {
            EventKind::RunStarted => {}
            EventKind::StepStarted { step, attempt, group } => {
                o.step = Some(step);
                o.attempt = Some(*attempt);
                o.group = group.as_deref();
            }
            EventKind::Retry { step, kind, attempt, error, delay_ms } => {
                o.step = Some(step);
                o.kind = Some(*kind);
                o.attempt = Some(*attempt);
                o.error = Some(error);
                o.delay_ms = Some(*delay_ms);
            }
            EventKind::StepCompleted { step, attempt } => {
                o.step = Some(step);
                o.attempt = Some(*attempt);
            }
            EventKind::StepUnknown { step, kind, attempt, reason } => {
                o.step = Some(step);
                o.kind = Some(*kind);
                o.attempt = Some(*attempt);
                o.reason = Some(reason);
            }
            EventKind::StepFailed { step, error }
            | EventKind::CompensationFailed { step, error } => {
                o.step = Some(step);
                o.error = Some(error);
            }
            EventKind::CompensationStarted { step, group } => {
                o.step = Some(step);
                o.group = group.as_deref();
            }
            EventKind::Compensated { step } => o.step = Some(step),
            EventKind::RunPaused { step, kind, error } => {
                o.step = Some(step);
                o.kind = Some(*kind);
                o.error = Some(error);
            }
            EventKind::Operator { action, by } => {
                o.action = Some(*action);
                o.by = Some(by);
            }
            EventKind::RunCancelled { by, reason } => {
                o.by = Some(by);
                o.reason = reason.as_deref();
            }
            EventKind::RunEnded { report } => o.report = Some(report),
        }
        o.serialize(s)
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = EventIn::deserialize(d)?;
        let ty = &*w.ty;
        let step = || need(w.step.clone(), ty, "step");
        let attempt = || need(w.attempt, ty, "attempt");
        let kind = || need(w.kind, ty, "kind");
        let error = || need(w.error.clone(), ty, "error");
        Ok(match ty {
            "run_started" => EventKind::RunStarted,
            "step_started" => {
                EventKind::StepStarted { step: step()?, attempt: attempt()?, group: w.group }
            }
            "retry" => EventKind::Retry {
                step: step()?,
                kind: kind()?,
                attempt: attempt()?,
                error: error()?,
                delay_ms: need(w.delay_ms, ty, "delayMs")?,
            },
            "step_completed" => EventKind::StepCompleted { step: step()?, attempt: attempt()? },
            "step_unknown" => EventKind::StepUnknown {
                step: step()?,
                kind: kind()?,
                attempt: attempt()?,
                reason: need(w.reason, ty, "reason")?,
            },
            "step_failed" => EventKind::StepFailed { step: step()?, error: error()? },
            "compensation_started" => {
                EventKind::CompensationStarted { step: step()?, group: w.group }
            }
            "compensated" => EventKind::Compensated { step: step()? },
            "compensation_failed" => {
                EventKind::CompensationFailed { step: step()?, error: error()? }
            }
            "run_paused" => EventKind::RunPaused { step: step()?, kind: kind()?, error: error()? },
            "operator" => EventKind::Operator {
                action: need(w.action, ty, "action")?,
                by: need(w.by, ty, "by")?,
            },
            "run_cancelled" => {
                EventKind::RunCancelled { by: need(w.by, ty, "by")?, reason: w.reason }
            }
            "run_ended" => EventKind::RunEnded { report: need(w.report, ty, "report")? },
            other => return Err(unknown_type("event", other, EVENT_TYPES)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_is_listed() {
        let ev = EventKind::Compensated { step: "a".into() };
        assert!(EVENT_TYPES.contains(&ev.type_name()));
        assert_eq!(EVENT_TYPES.len(), 13);
    }

    #[test]
    fn unions_are_flat_maps_with_a_type() {
        let out = OutcomeResult::Failed(StepFailure::new("boom", false));
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "failed", "message": "boom", "retryable": false})
        );
        let back: OutcomeResult =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&out).unwrap()).unwrap();
        assert_eq!(back, out);
        let err = serde_json::from_str::<OutcomeResult>(r#"{"type":"done"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown outcome type `done`"), "{err}");
        let err = serde_json::from_str::<OutcomeResult>(r#"{"type":"failed"}"#).unwrap_err();
        assert!(err.to_string().contains("`failed` needs the field `message`"), "{err}");
    }

    #[test]
    fn a_completed_output_stays_bin_in_messagepack() {
        let out = OutcomeResult::Completed { output: Payload::encode(&"ok").unwrap() };
        let bytes = rmp_serde::to_vec_named(&out).unwrap();
        // {"type": "completed", "output": bin [0xa2 'o' 'k']}
        let mut want = vec![0x82, 0xa4];
        want.extend_from_slice(b"type");
        want.push(0xa9);
        want.extend_from_slice(b"completed");
        want.push(0xa6);
        want.extend_from_slice(b"output");
        want.extend_from_slice(&[0xc4, 0x03, 0xa2, b'o', b'k']);
        assert_eq!(bytes, want);
        assert_eq!(rmp_serde::from_slice::<OutcomeResult>(&bytes).unwrap(), out);
    }
}
