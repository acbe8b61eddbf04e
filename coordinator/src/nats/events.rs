use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use orchestrix_proto::{CommandKind, EventKind, RunEvent, RunReport, Subjects, encode, time};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;
use uuid::Uuid;

use crate::{Hooks, StepEvent};

/// Hooks that publish every run's lifecycle on NATS, on
/// `{prefix}.events.{run_id}`, so other services (and `orchestrix watch`)
/// can follow runs. Publishing never blocks a run: events go through a queue
/// to one publisher task.
pub struct EventPublisher {
    subjects: Subjects,
    tx: mpsc::UnboundedSender<(String, Bytes)>,
    task: JoinHandle<()>,
}

impl fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventPublisher")
            .field("prefix", &self.subjects.prefix())
            .finish_non_exhaustive()
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventPublisher {
    /// Starts the publisher task. Call from within a tokio runtime.
    pub fn start(client: async_nats::Client, subjects: Subjects) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Bytes)>();
        let task = tokio::spawn(async move {
            while let Some((subject, bytes)) = rx.recv().await {
                if let Err(e) = client.publish(subject, bytes).await {
                    warn!(error = %e, "cannot publish a run event");
                }
            }
        });
        EventPublisher { subjects, tx, task }
    }

    fn emit(&self, run_id: Uuid, flow: &str, event: EventKind) {
        let ev = RunEvent {
            run_id,
            flow: flow.to_owned(),
            at_ms: time::unix_ms(SystemTime::now()),
            event,
        };
        match encode(&ev) {
            Ok(bytes) => {
                let _ = self.tx.send((self.subjects.events(&run_id), Bytes::from(bytes)));
            }
            Err(e) => warn!(error = %e, "cannot encode a run event"),
        }
    }
}

impl Hooks for EventPublisher {
    fn on_run_start(&self, run_id: Uuid, flow: &str) {
        self.emit(run_id, flow, EventKind::RunStarted);
    }

    fn on_step_start(&self, e: &StepEvent<'_>) {
        self.emit(
            e.run_id.into(),
            e.flow,
            EventKind::StepStarted {
                step: e.step.into(),
                attempt: e.attempt,
                group: e.group.map(str::to_owned),
            },
        );
    }

    fn on_step_retry(&self, e: &StepEvent<'_>, error: &str, delay: Duration) {
        let event = EventKind::Retry {
            step: e.step.into(),
            kind: e.kind,
            attempt: e.attempt,
            error: error.into(),
            delay_ms: delay.as_millis() as u64,
        };
        self.emit(e.run_id.into(), e.flow, event);
    }

    fn on_step_success(&self, e: &StepEvent<'_>, _duration: Duration) {
        self.emit(
            e.run_id.into(),
            e.flow,
            EventKind::StepCompleted { step: e.step.into(), attempt: e.attempt },
        );
    }

    fn on_step_unknown(&self, e: &StepEvent<'_>, reason: &str) {
        let event = EventKind::StepUnknown {
            step: e.step.into(),
            kind: e.kind,
            attempt: e.attempt,
            reason: reason.into(),
        };
        self.emit(e.run_id.into(), e.flow, event);
    }

    fn on_step_failure(&self, e: &StepEvent<'_>, error: &str) {
        self.emit(
            e.run_id.into(),
            e.flow,
            EventKind::StepFailed { step: e.step.into(), error: error.into() },
        );
    }

    fn on_compensation_start(&self, e: &StepEvent<'_>) {
        let event = EventKind::CompensationStarted {
            step: e.step.into(),
            group: e.group.map(str::to_owned),
        };
        self.emit(e.run_id.into(), e.flow, event);
    }

    fn on_compensation_success(&self, e: &StepEvent<'_>, _duration: Duration) {
        self.emit(e.run_id.into(), e.flow, EventKind::Compensated { step: e.step.into() });
    }

    fn on_compensation_failure(&self, e: &StepEvent<'_>, error: &str) {
        self.emit(
            e.run_id.into(),
            e.flow,
            EventKind::CompensationFailed { step: e.step.into(), error: error.into() },
        );
    }

    fn on_run_paused(&self, e: &StepEvent<'_>, error: &str) {
        let kind = EventKind::RunPaused { step: e.step.into(), kind: e.kind, error: error.into() };
        self.emit(e.run_id.into(), e.flow, kind);
    }

    fn on_operator_action(
        &self,
        run_id: uuid::Uuid,
        flow: &str,
        action: orchestrix_proto::ControlAction,
        by: &str,
    ) {
        self.emit(run_id, flow, EventKind::Operator { action, by: by.into() });
    }

    fn on_run_cancelled(&self, run_id: uuid::Uuid, flow: &str, by: &str, reason: Option<&str>) {
        let kind = EventKind::RunCancelled { by: by.into(), reason: reason.map(str::to_owned) };
        self.emit(run_id, flow, kind);
    }

    fn on_run_end(&self, report: &RunReport) {
        self.emit(
            report.run_id.into(),
            &report.flow,
            EventKind::RunEnded { report: Box::new(report.clone()) },
        );
    }
}

/// One line per event, for people: `retry process-payment #2 in 1000 ms: declined`.
pub fn describe(event: &EventKind) -> String {
    match event {
        EventKind::RunStarted => "run started".into(),
        EventKind::StepStarted { step, attempt, group: None } => {
            format!("{step}: attempt {attempt} sent")
        }
        EventKind::StepStarted { step, attempt, group: Some(g) } => {
            format!("{step} [group {g}]: attempt {attempt} sent")
        }
        EventKind::Retry { step, kind, attempt, error, delay_ms } => {
            let what = if *kind == CommandKind::Compensate { "compensation " } else { "" };
            format!("{step}: {what}attempt {attempt} failed ({error}); retry in {delay_ms} ms")
        }
        EventKind::StepCompleted { step, attempt } => {
            format!("{step}: completed after {attempt} attempt(s)")
        }
        EventKind::StepUnknown { step, kind, attempt, reason } => {
            let what = if *kind == CommandKind::Compensate { "compensation " } else { "" };
            format!("{step}: {what}attempt {attempt} has an unknown outcome ({reason})")
        }
        EventKind::StepFailed { step, error } => {
            format!("{step}: failed for good ({error}); rolling back")
        }
        EventKind::CompensationStarted { step, group: None } => format!("{step}: compensating"),
        EventKind::CompensationStarted { step, group: Some(g) } => {
            format!("{step} [group {g}]: compensating")
        }
        EventKind::Compensated { step } => format!("{step}: compensated"),
        EventKind::CompensationFailed { step, error } => {
            format!("{step}: compensation failed ({error})")
        }
        EventKind::RunPaused { step, kind, error } => {
            format!("paused at {step} {}: {error} (waiting for an operator)", kind.as_str())
        }
        EventKind::Operator { action, by } => format!("{} by {by}", action.as_str()),
        EventKind::RunCancelled { by, reason } => match reason {
            Some(r) => format!("cancelled by {by}: {r}"),
            None => format!("cancelled by {by}"),
        },
        EventKind::RunEnded { report } => format!("run ended: {}", report.status),
    }
}

/// A run event as JSON, in the one key case of all JSON output: the
/// report's camelCase (`runId`, `atMs`, `stepStarted`). Payloads (`input`,
/// `output`) and embedded reports keep their own keys.
pub fn event_json(event: &RunEvent) -> serde_json::Value {
    camel_case(serde_json::to_value(event).unwrap_or_default())
}

/// Object keys in camelCase, as the run report writes them: the one key case
/// of all JSON the CLI and the run browser print. Users' data (`input`,
/// `output`, an input schema) and embedded reports keep their own keys.
pub fn camel_case(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let mut key = String::with_capacity(k.len());
                    let mut upper = false;
                    for c in k.chars() {
                        if c == '_' {
                            upper = true;
                        } else if upper {
                            key.extend(c.to_uppercase());
                            upper = false;
                        } else {
                            key.push(c);
                        }
                    }
                    let keep = ["report", "output", "input", "input_schema", "inputSchema"];
                    let v = if keep.contains(&k.as_str()) { v } else { camel_case(v) };
                    (key, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case).collect()),
        other => other,
    }
}
