use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::RunId;

use crate::{Payload, time};

/// Where a run stands. Every run ends in a terminal state (see
/// [`RunStatus::is_terminal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for its turn: other runs with the same concurrency key hold
    /// every slot of the flow's limit per key. Starts, in arrival order, as
    /// they end; a queued run can be cancelled.
    Queued,
    /// Still executing or compensating.
    Running,
    /// A step's (or compensation's) retries ran out and it is set to pause:
    /// the run waits for an operator (`resume` or `rollback`).
    Paused,
    /// Every step completed.
    Completed,
    /// A step failed for good; every completed step with a compensation was compensated.
    Failed,
    /// A step failed for good and at least one compensation failed too: the
    /// report names the steps whose side effects were not undone.
    CompensationFailed,
    /// The run's stored record could not be used (it does not decode, or its
    /// flow no longer matches it): it was moved aside, nothing more runs, and
    /// an operator must look at it. The report's `error` says why.
    Quarantined,
    /// An operator cancelled the run: the step in flight was stopped and the
    /// completed (and maybe-done) steps were compensated. The report's
    /// `actions` say who and why.
    Cancelled,
}

impl RunStatus {
    /// Every status, for parsing and listing.
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Paused,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::CompensationFailed,
        RunStatus::Cancelled,
        RunStatus::Quarantined,
    ];

    /// True for every status but [`RunStatus::Queued`], [`RunStatus::Running`]
    /// and [`RunStatus::Paused`].
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running | RunStatus::Paused)
    }

    /// The status as written in JSON: `running`, `completed`, `failed`, `compensation_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::CompensationFailed => "compensation_failed",
            RunStatus::Quarantined => "quarantined",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached: an earlier step failed, or the run has not got there yet.
    NotRun,
    /// An attempt is in flight or a retry is scheduled.
    Running,
    /// No worker has taken the attempt's command yet: it is sent again until
    /// one does (or the wait for a worker runs out).
    Waiting,
    /// The step's handler succeeded (and it was not rolled back).
    Completed,
    /// The step's handler failed for good: this step started the rollback.
    Failed,
    /// The step completed, then its compensation is in flight.
    Compensating,
    /// The step completed, then its compensation undid it.
    Compensated,
    /// The step completed, and its compensation failed for good.
    CompensationFailed,
    /// The step's last attempt has an unknown outcome (its worker acked it,
    /// then went silent, timed out or was lost): it may have had its effect.
    /// Such a step ends the run like a failure, and rollback runs its
    /// compensation too when it has one.
    Unknown,
    /// The run was cancelled while this step waited for a worker, a retry or
    /// its first answer, before any worker started it.
    Cancelled,
    /// Its retries (or its compensation's) ran out and the run waits for an
    /// operator; `error` is the last attempt's.
    Paused,
}

impl StepStatus {
    /// Every status, for parsing and listing.
    pub const ALL: [StepStatus; 11] = [
        StepStatus::NotRun,
        StepStatus::Running,
        StepStatus::Waiting,
        StepStatus::Completed,
        StepStatus::Failed,
        StepStatus::Compensating,
        StepStatus::Compensated,
        StepStatus::CompensationFailed,
        StepStatus::Unknown,
        StepStatus::Cancelled,
        StepStatus::Paused,
    ];

    /// The status as written in JSON, e.g. `compensation_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::NotRun => "not_run",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Compensating => "compensating",
            StepStatus::Compensated => "compensated",
            StepStatus::CompensationFailed => "compensation_failed",
            StepStatus::Unknown => "unknown",
            StepStatus::Cancelled => "cancelled",
            StepStatus::Paused => "paused",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a step's compensation went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompensationReport {
    /// Compensation attempts made.
    pub attempts: u32,
    /// The last compensation error, if any attempt failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Time from the first compensation attempt to the last outcome.
    #[serde(with = "time::opt_duration_ms", default, rename = "durationMs")]
    pub duration: Option<Duration>,
}

/// One step of a run, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    /// Step name.
    pub name: String,
    /// Where the step stands.
    pub status: StepStatus,
    /// Attempts of the step's handler (0 if it never ran).
    pub attempts: u32,
    /// The error of the last failed attempt, if any. A step that completed
    /// after retries keeps the error of its last failure here.
    #[serde(default)]
    pub error: Option<String>,
    /// The handler's output, once completed.
    #[serde(default)]
    pub output: Option<Payload>,
    /// When the first attempt started.
    #[serde(with = "time::opt_unix_ms", default, rename = "startedAtMs")]
    pub started_at: Option<SystemTime>,
    /// From the first attempt's start to the final outcome, retries included.
    #[serde(with = "time::opt_duration_ms", default, rename = "durationMs")]
    pub duration: Option<Duration>,
    /// The compensation, when one ran.
    #[serde(default)]
    pub compensation: Option<CompensationReport>,
    /// While the step is `waiting`: why (no worker of the run's version took it, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The parallel group the step ran in, if any: the steps of one group
    /// ran at the same time, and were compensated at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The report of a run: what the caller of `run` gets back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// Unique id of the run.
    pub run_id: RunId,
    /// Flow name.
    pub flow: String,
    /// The version of the flow the run is pinned to (distributed runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where the run stands.
    pub status: RunStatus,
    /// Wall time from start to the terminal state (so far, while running).
    #[serde(with = "time::duration_ms", rename = "durationMs")]
    pub duration: Duration,
    /// When the run started.
    #[serde(with = "time::opt_unix_ms", default, rename = "startedAtMs")]
    pub started_at: Option<SystemTime>,
    /// Why the run failed: the failing step's error.
    #[serde(default)]
    pub error: Option<String>,
    /// The step whose failure started the rollback.
    #[serde(default)]
    pub failed_step: Option<String>,
    /// Every step of the flow, in flow order.
    pub steps: Vec<StepReport>,
    /// Answers that arrived for attempts the run had already given up on
    /// (a worker that came back after its attempt was declared unknown, say):
    /// recorded, never applied. One line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<String>,
    /// What operators did to the run (cancel, …), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<OperatorAction>,
    /// While the run is paused: where, since when, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PauseReport>,
}

/// Where and since when a paused run waits for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseReport {
    /// The step.
    pub step: String,
    /// Its action (`execute`) or its compensation (`compensate`).
    pub kind: crate::CommandKind,
    /// When it paused.
    #[serde(with = "time::unix_ms_serde", rename = "sinceMs")]
    pub since: SystemTime,
    /// When it rolls back on its own (its pause timeout), if ever.
    #[serde(with = "time::opt_unix_ms", default, rename = "untilMs")]
    pub until: Option<SystemTime>,
}

/// Something an operator did to a run: recorded in its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorAction {
    /// What: `cancel`.
    pub action: ControlAction,
    /// Who asked (a user name, a service, `cli@host`).
    pub by: String,
    /// Why, if they said.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was applied.
    #[serde(with = "time::unix_ms_serde", rename = "atMs")]
    pub at: SystemTime,
}

/// An operator's action on a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Stop the run: cancel the attempt in flight, compensate, end `cancelled`.
    Cancel,
    /// Continue a paused run: retry the paused step (or compensation) with a
    /// fresh budget of attempts.
    Resume,
    /// Roll a paused run back: the paused step fails for good (a paused
    /// compensation counts as failed) and the rollback goes on.
    Rollback,
}

impl ControlAction {
    /// The action as written in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Cancel => "cancel",
            ControlAction::Resume => "resume",
            ControlAction::Rollback => "rollback",
        }
    }
}

impl RunReport {
    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The step whose failure started the rollback.
    pub fn failed(&self) -> Option<&StepReport> {
        let name = self.failed_step.as_deref()?;
        self.step(name)
    }

    /// Steps whose compensation failed for good: side effects left in place.
    pub fn uncompensated(&self) -> impl Iterator<Item = &StepReport> {
        self.steps.iter().filter(|s| s.status == StepStatus::CompensationFailed)
    }
}

impl fmt::Display for RunReport {
    /// A multi-line summary: the run, then one line per step.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version =
            self.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default();
        writeln!(
            f,
            "run {} of {}{version}: {} in {} ms",
            self.run_id,
            self.flow,
            self.status,
            self.duration.as_millis()
        )?;
        match (&self.failed_step, &self.error) {
            (Some(step), Some(err)) => writeln!(f, "  failed at {step}: {err}")?,
            (None, Some(err)) => writeln!(f, "  {err}")?,
            _ => {}
        }
        for s in &self.steps {
            let group = s.group.as_deref().map(|g| format!(" [group {g}]")).unwrap_or_default();
            write!(
                f,
                "  {}{group}: {} ({} attempt{})",
                s.name,
                s.status,
                s.attempts,
                plural(s.attempts)
            )?;
            if let Some(err) = &s.error {
                write!(f, ", last error: {err}")?;
            }
            if let Some(why) = &s.waiting {
                write!(f, ", {why}")?;
            }
            if let Some(c) = &s.compensation {
                write!(f, ", compensation: {} attempt{}", c.attempts, plural(c.attempts))?;
                if let Some(err) = &c.error {
                    write!(f, ", last error: {err}")?;
                }
            }
            writeln!(f)?;
        }
        for l in &self.late {
            writeln!(f, "  late: {l}")?;
        }
        if let Some(p) = &self.paused {
            let since = SystemTime::now().duration_since(p.since).unwrap_or_default();
            write!(f, "  paused at {} ({}) for {} s", p.step, p.kind.as_str(), since.as_secs())?;
            match p.until.and_then(|u| u.duration_since(SystemTime::now()).ok()) {
                Some(left) => writeln!(f, "; rolls back on its own in {} s", left.as_secs())?,
                None => writeln!(f, "; waiting for `resume` or `rollback`")?,
            }
        }
        for a in &self.actions {
            let why = a.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            // The cancel that ended the run is its error line already.
            if a.action == ControlAction::Cancel
                && self.error.as_deref() == Some(format!("cancelled by {}{why}", a.by).as_str())
            {
                continue;
            }
            writeln!(f, "  {} by {}{why}", a.action.as_str(), a.by)?;
        }
        Ok(())
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl std::str::FromStr for RunStatus {
    type Err = String;

    /// Parses the JSON form (`compensation_failed`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
            format!("`{s}` is not a status ({})", all.join(", "))
        })
    }
}

impl std::str::FromStr for StepStatus {
    type Err = String;

    /// Parses the JSON form (`not_run`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StepStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a step status"))
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn statuses_parse_from_their_json_form() {
        for st in ["running", "paused", "compensation_failed", "cancelled"] {
            assert_eq!(st.parse::<RunStatus>().unwrap().as_str(), st);
        }
        assert!("weird".parse::<RunStatus>().unwrap_err().contains("paused"));
        assert_eq!("not_run".parse::<StepStatus>().unwrap(), StepStatus::NotRun);
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    fn action(action: ControlAction, by: &str, reason: Option<&str>) -> OperatorAction {
        OperatorAction {
            action,
            by: by.into(),
            reason: reason.map(Into::into),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_cancelled_run_states_its_cause_once() {
        let report = RunReport {
            run_id: uuid::Uuid::nil().into(),
            flow: "shop".into(),
            version: None,
            status: RunStatus::Cancelled,
            duration: Duration::from_millis(12),
            started_at: None,
            error: Some("cancelled by ops: customer asked".into()),
            failed_step: None,
            steps: Vec::new(),
            late: Vec::new(),
            actions: vec![
                action(ControlAction::Rollback, "oncall", None),
                action(ControlAction::Cancel, "ops", Some("customer asked")),
                // A second cancel, which changed nothing, is a fact of its own.
                action(ControlAction::Cancel, "bot", None),
            ],
            paused: None,
        };
        let text = report.to_string();
        assert_eq!(text.matches("customer asked").count(), 1, "{text}");
        assert!(text.contains("\n  cancelled by ops: customer asked\n"), "{text}");
        assert!(!text.contains("cancel by ops"), "{text}");
        assert!(text.contains("\n  rollback by oncall\n"), "{text}");
        assert!(text.contains("\n  cancel by bot\n"), "{text}");
    }
}
