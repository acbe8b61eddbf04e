//! Options of a run and filters of run listings: the same types for the
//! embedded engine, a coordinator and a remote client.

use std::time::Duration;

use crate::RunReport;

/// Options of one run.
///
/// ```
/// use std::time::Duration;
/// use orchestrix_proto::RunOptions;
///
/// let opts = RunOptions::new().key("payment:order_1").ttl(Duration::from_secs(3600));
/// assert_eq!(opts.key.as_deref(), Some("payment:order_1"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOptions {
    /// Idempotency key: while a run with this key is live, or for `ttl` after it
    /// ended, another run with the key returns that run's report instead of
    /// executing anything.
    pub key: Option<String>,
    /// How long the key is remembered after its run ended (default: 24 hours).
    pub ttl: Option<Duration>,
    /// Deadline of the whole run: when it passes, the step in flight fails for
    /// good and the rollback starts (compensations are not cut short).
    pub timeout: Option<Duration>,
    /// W3C `traceparent` of the caller's span: the run's span becomes its
    /// child. When `None`, the span current where `start` is called is used
    /// (if a tracer is installed).
    pub traceparent: Option<String>,
    /// The version of the flow to run (distributed flows from the registry);
    /// `None`: the newest version with a live worker.
    pub version: Option<String>,
    /// Concurrency key (`account:42`): at most the flow's limit per key
    /// (default 1) of its runs with this key run at once; the others wait,
    /// `queued`, in arrival order.
    pub concurrency_key: Option<String>,
}

impl RunOptions {
    /// No key, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets how long the key outlives its run.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the run's deadline.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs this version of the flow rather than the newest one served.
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets the concurrency key: runs of the flow with the same key run at
    /// most the flow's limit per key (default 1) at a time, the others
    /// waiting their turn in arrival order.
    #[must_use]
    pub fn concurrency_key(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    /// Makes the run's span a child of this W3C `traceparent`.
    #[must_use]
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The same options with every field given (`None`: unset).
    #[must_use]
    pub fn with(
        key: Option<String>,
        ttl: Option<Duration>,
        timeout: Option<Duration>,
        version: Option<String>,
    ) -> Self {
        RunOptions { key, ttl, timeout, version, traceparent: None, concurrency_key: None }
    }
}

/// Which runs `list` returns, locally (a coordinator's store) or remotely
/// (a client asking a coordinator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only runs in this status.
    pub status: Option<crate::RunStatus>,
    /// Only runs of this flow.
    pub flow: Option<String>,
    /// At most this many (0: 100).
    pub limit: usize,
    /// Only runs older than this one (ids are time-ordered): the cursor of
    /// the next page, the last run of the page before.
    pub before: Option<crate::RunId>,
}

impl ListFilter {
    /// A filter: `status` and `flow` when given, at most `limit` runs.
    pub fn new(status: Option<crate::RunStatus>, flow: Option<String>, limit: usize) -> Self {
        ListFilter { status, flow, limit, before: None }
    }

    /// The page after the run `last` (see [`ListFilter::before`]).
    #[must_use]
    pub fn before(mut self, last: crate::RunId) -> Self {
        self.before = Some(last);
        self
    }

    /// Whether `r` passes the filter.
    pub fn keeps(&self, r: &RunReport) -> bool {
        self.status.is_none_or(|s| s == r.status)
            && self.flow.as_deref().is_none_or(|f| f == r.flow)
            && self.before.is_none_or(|b| r.run_id < b)
    }

    /// Sorts newest first and cuts to the limit.
    pub fn finish(&self, mut reports: Vec<RunReport>) -> Vec<RunReport> {
        reports.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.run_id.cmp(&a.run_id)));
        reports.truncate(if self.limit == 0 { 100 } else { self.limit });
        reports
    }
}
