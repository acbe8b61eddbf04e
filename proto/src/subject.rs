/// The longest flow or step name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// A flow, step or prefix name that cannot be used in a subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// What was being named (flow, step, prefix).
        what: &'static str,
    },
    /// The name is too long.
    #[error("{what} name `{name}` is longer than {MAX_NAME_LEN} characters")]
    TooLong {
        /// What was being named.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The name holds a character that is not allowed.
    #[error(
        "{what} name `{name}` may only hold ASCII letters, digits, `-` and `_` (found {found:?})"
    )]
    BadChar {
        /// What was being named.
        what: &'static str,
        /// The name.
        name: String,
        /// The first offending character.
        found: char,
    },
}

/// Checks that `name` can be one subject token: 1 to 128 ASCII letters, digits,
/// `-` or `_`. Flow and step names are checked with it when a flow is defined,
/// so no subject is ever built from an unchecked name.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { what, name: name.to_owned() });
    }
    if let Some(found) =
        name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(NameError::BadChar { what, name: name.to_owned(), found });
    }
    Ok(())
}

/// Builds every subject Orchestrix uses, under one prefix so that several
/// deployments can share a NATS account.
///
/// ```
/// use orchestrix_proto::Subjects;
/// let s = Subjects::new("shop.prod").unwrap();
/// assert_eq!(s.step("payment-flow", "1a2b", "charge"), "shop.prod.step.payment-flow.1a2b.charge");
/// assert!(Subjects::new("bad prefix").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects { prefix: Self::DEFAULT_PREFIX.to_owned() }
    }
}

impl Subjects {
    /// The prefix used when none is configured.
    pub const DEFAULT_PREFIX: &'static str = "orchestrix";

    /// Subjects under `prefix`: one or more dot-separated names.
    pub fn new(prefix: &str) -> Result<Self, NameError> {
        if prefix.is_empty() {
            return Err(NameError::Empty { what: "prefix" });
        }
        for token in prefix.split('.') {
            validate_name("prefix", token)?;
        }
        Ok(Subjects { prefix: prefix.to_owned() })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where commands for one step of one version of a flow are published:
    /// a run is pinned to the version it started on, so only the workers of
    /// that version get its commands.
    pub fn step(&self, flow: &str, version: &str, step: &str) -> String {
        // Built by hand: one per command sent, and `format!` showed in profiles.
        let mut s =
            String::with_capacity(self.prefix.len() + flow.len() + version.len() + step.len() + 8);
        for part in [&*self.prefix, ".step.", flow, ".", version, ".", step] {
            s.push_str(part);
        }
        s
    }

    /// What a worker that serves a step for every version of its flow
    /// subscribes to (a worker for a flow applied from a file, say).
    pub fn step_any_version(&self, flow: &str, step: &str) -> String {
        format!("{}.step.{flow}.*.{step}", self.prefix)
    }

    /// The queue group in which the replicas of a step's workers share
    /// commands: one per step whatever the version, so that a command goes to
    /// exactly one worker even when some serve one version and some every one.
    pub fn step_queue_group(&self, flow: &str, step: &str) -> String {
        format!("{}.{flow}.{step}", self.prefix)
    }

    /// Where callers send [`crate::RunRequest`]s for `flow`: only coordinators
    /// that serve the flow listen there, so coordinators serving different
    /// flows can share one NATS.
    pub fn run_requests(&self, flow: &str) -> String {
        format!("{}.run.{flow}", self.prefix)
    }

    /// Where a coordinator that resumes a run asks every worker of a step
    /// whether it holds a command (workers listen here without a queue group).
    pub fn inquiries(&self, flow: &str, step: &str) -> String {
        format!("{}.inquire.{flow}.{step}", self.prefix)
    }

    /// Where operators send [`crate::ControlRequest`]s (every coordinator
    /// listens, without a queue group; the one running the run answers).
    pub fn control_requests(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Where callers send [`crate::StatusRequest`]s.
    pub fn status_requests(&self) -> String {
        format!("{}.status", self.prefix)
    }

    /// Where a coordinator that does not know a run asks the others (no
    /// queue group): a run its coordinator holds only in its journal so far
    /// is known to that coordinator alone. Coordinators only.
    pub fn status_peer_requests(&self) -> String {
        format!("{}.status.peers", self.prefix)
    }

    /// Where callers send [`crate::ListRequest`]s.
    pub fn list_requests(&self) -> String {
        format!("{}.list", self.prefix)
    }

    /// Where workers send acks, heartbeats and outcomes for one coordinator instance.
    pub fn replies(&self, coordinator: &str) -> String {
        format!("{}.reply.{coordinator}", self.prefix)
    }

    /// Lifecycle events of one run.
    pub fn events(&self, run_id: &uuid::Uuid) -> String {
        format!("{}.events.{run_id}", self.prefix)
    }

    /// Lifecycle events of every run.
    pub fn all_events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("step", "reserve-stock").is_ok());
        assert!(validate_name("step", "a_B-9").is_ok());
        assert!(matches!(validate_name("step", ""), Err(NameError::Empty { .. })));
        assert!(matches!(validate_name("step", "a.b"), Err(NameError::BadChar { found: '.', .. })));
        assert!(matches!(validate_name("step", "a*"), Err(NameError::BadChar { .. })));
        assert!(matches!(validate_name("step", "a b"), Err(NameError::BadChar { .. })));
        assert!(matches!(validate_name("flow", &"x".repeat(129)), Err(NameError::TooLong { .. })));
        assert!(Subjects::new("a..b").is_err());
        assert!(Subjects::new("a.>").is_err());
        assert!(Subjects::new("").is_err());
    }

    #[test]
    fn subjects() {
        let s = Subjects::default();
        assert_eq!(s.run_requests("pay"), "orchestrix.run.pay");
        assert_eq!(s.step("pay", "v2", "charge"), "orchestrix.step.pay.v2.charge");
        assert_eq!(s.step_any_version("pay", "charge"), "orchestrix.step.pay.*.charge");
        assert_eq!(s.inquiries("pay", "charge"), "orchestrix.inquire.pay.charge");
        assert_eq!(s.replies("c1"), "orchestrix.reply.c1");
        assert_eq!(s.all_events(), "orchestrix.events.>");
    }
}
