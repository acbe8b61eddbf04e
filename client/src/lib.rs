//! Start runs on Orchestrix coordinators over NATS and follow them, from any
//! service: no engine, no actix, no exporter. The types are the ones the
//! embedded engine uses ([`RunOptions`], [`RunReport`], [`ListFilter`]), so
//! code moves between the two unchanged.
//!
//! ```no_run
//! # async fn f() -> Result<(), orchestrix_client::ClientError> {
//! use orchestrix_client::{Client, RunOptions};
//! use orchestrix_worker::NatsOptions;
//!
//! let client = Client::connect(&NatsOptions::new("nats://127.0.0.1:4222")).await?;
//! let input = serde_json::json!({"orderId": "order_1", "amount": 50, "userId": "user_A"});
//! let report = client.run("payment-flow", &input, RunOptions::new()).await?;
//! println!("{}", report.status);
//! # Ok(()) }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use bytes::Bytes;
use orchestrix_proto::{
    CodecError, Message, Payload, RunReply, RunRequest, StatusRequest, Subjects, decode, encode,
    headers,
};
use orchestrix_worker::{ConnectError, NatsOptions};
use serde::Serialize;

pub use orchestrix_proto::{
    ListFilter, RunId, RunOptions, RunReport, RunStatus, StepReport, StepStatus,
};

/// A request to a coordinator failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The input could not be encoded, or the answer decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// No coordinator answered.
    #[error("no answer from a coordinator on {subject}: {reason}")]
    NoCoordinator {
        /// The subject asked.
        subject: String,
        /// What NATS said.
        reason: String,
    },
    /// The coordinator refused the request; `kind` says why without
    /// reading the text.
    #[error("{message}")]
    Rejected {
        /// Why, as a kind to match on.
        kind: Rejection,
        /// Why, in words.
        message: String,
    },
    /// The coordinator could not do it now (its store was unavailable); the
    /// same request may succeed later.
    #[error("{0} (retryable)")]
    Unavailable(String),
    /// NATS refused the request: this client's user may not publish there.
    #[error("NATS refused the request: {0} (see `orchestrix auth config`)")]
    Permission(String),
    /// The coordinator answered something else than expected.
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
}

/// Why a coordinator refused a request (see [`ClientError::Rejected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// No coordinator serves a flow of that name.
    UnknownFlow,
    /// The flow has no such version.
    UnknownVersion,
    /// No run with that id is kept.
    UnknownRun,
    /// The request was malformed, expired, or had a bad option.
    BadRequest,
    /// The run's input was refused (does not decode, too large).
    BadInput,
    /// The action does not apply to the run as it stands (it finished, say).
    Refused,
    /// Anything else, or a coordinator that gives no reason code.
    Other,
}

impl Rejection {
    /// The kind a wire code (`RunReply::CODE_*`) names.
    pub fn from_code(code: &str) -> Rejection {
        match code {
            RunReply::CODE_UNKNOWN_FLOW => Rejection::UnknownFlow,
            RunReply::CODE_UNKNOWN_VERSION => Rejection::UnknownVersion,
            RunReply::CODE_UNKNOWN_RUN => Rejection::UnknownRun,
            RunReply::CODE_BAD_REQUEST => Rejection::BadRequest,
            RunReply::CODE_BAD_INPUT => Rejection::BadInput,
            RunReply::CODE_REFUSED => Rejection::Refused,
            _ => Rejection::Other,
        }
    }
}

impl ClientError {
    /// Why the coordinator refused, if it did.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            ClientError::Rejected { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A run a [`Client::submit`] started, or found by its idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Started {
    /// The run's id.
    pub run_id: RunId,
    /// The key named an earlier run: nothing new started.
    pub duplicate: bool,
}

/// How often [`Client::wait`] asks whether the run it waits for ended
/// elsewhere (its coordinator died and another finished the run).
pub const WAIT_LOOK_EVERY: Duration = Duration::from_secs(2);

/// How long a run may be unknown to every coordinator while it is taken
/// over: one younger than its first checkpoint (about a second) lives only
/// in the journal of the coordinator that drives it, until another takes
/// that coordinator's runs over, within about 4 s of its death
/// (docs/durability.md). [`Client::wait`] asks again for this long before
/// it takes `unknown_run` for an answer; so does the CLI's `status`.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(8);

/// How long [`Client::wait`] rides out a store that cannot answer (its
/// answers say "retryable") before it gives that answer up to its caller:
/// a JetStream stream electing a new leader takes seconds, not minutes.
pub const UNAVAILABLE_PATIENCE: Duration = Duration::from_secs(60);

/// Starts runs and follows them over NATS, from any service (see the crate docs).
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    request_timeout: Duration,
    start_retry_for: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("prefix", &self.subjects.prefix()).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to NATS with the default prefix.
    pub async fn connect(options: &NatsOptions) -> Result<Client, ClientError> {
        Ok(Client::new(options.connect().await?, Subjects::default()))
    }

    /// A client over an existing connection.
    pub fn new(nats: async_nats::Client, subjects: Subjects) -> Client {
        Client {
            nats,
            subjects,
            request_timeout: Duration::from_secs(5),
            start_retry_for: Duration::from_secs(30),
        }
    }

    /// How long to wait for a coordinator to accept a request (default 5 s).
    /// Waiting for a report is not bounded by it.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Starts a run and waits for its report.
    pub async fn run<I: Serialize + ?Sized>(
        &self,
        flow: &str,
        input: &I,
        options: RunOptions,
    ) -> Result<RunReport, ClientError> {
        self.run_payload(flow, Payload::encode(input)?, options).await
    }

    /// Starts a run whose input is already encoded and waits for its report.
    ///
    /// The run is started, then waited for by id: if its coordinator dies
    /// meanwhile, the wait goes on with whichever coordinator resumes it.
    pub async fn run_payload(
        &self,
        flow: &str,
        input: Payload,
        options: RunOptions,
    ) -> Result<RunReport, ClientError> {
        let run_id = self.start_payload(flow, input, options).await?;
        self.wait(run_id).await
    }

    /// Starts a run and returns its id at once.
    pub async fn start<I: Serialize + ?Sized>(
        &self,
        flow: &str,
        input: &I,
        options: RunOptions,
    ) -> Result<RunId, ClientError> {
        self.start_payload(flow, Payload::encode(input)?, options).await
    }

    /// Starts a run whose input is already encoded and returns its id at once.
    pub async fn start_payload(
        &self,
        flow: &str,
        input: Payload,
        options: RunOptions,
    ) -> Result<RunId, ClientError> {
        self.submit(flow, input, options).await.map(|s| s.run_id)
    }

    /// Starts a run and says whether its idempotency key named an earlier
    /// run (then nothing new started, and the id is that run's).
    pub async fn submit(
        &self,
        flow: &str,
        input: Payload,
        options: RunOptions,
    ) -> Result<Started, ClientError> {
        if let Err(e) = orchestrix_proto::validate_name("flow", flow) {
            return Err(ClientError::Rejected {
                kind: Rejection::BadRequest,
                message: e.to_string(),
            });
        }
        let keyed = options.key.is_some();
        let req = run_request(flow, input, options, false);
        let subject = self.subjects.run_requests(flow);
        // With an idempotency key a start is safe to send again: it starts the
        // run or finds the one it started. Without one it is sent once.
        let give_up = std::time::Instant::now() + self.start_retry_for;
        let mut pause = Duration::from_millis(100);
        let mut req = req;
        loop {
            // Each try expires with its wait: a coordinator that only gets it
            // later (frozen, slow) refuses it, so a start reported as failed
            // never runs behind the caller's back.
            let now = std::time::SystemTime::now();
            req.start_by_ms = Some(orchestrix_proto::time::unix_ms(now + self.request_timeout));
            let answer = self.ask(subject.clone(), &req, Some(self.request_timeout)).await;
            match answer {
                Ok(RunReply::Accepted { run_id, duplicate }) => {
                    return Ok(Started { run_id: run_id.into(), duplicate });
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e @ (ClientError::Unavailable(_) | ClientError::NoCoordinator { .. }))
                    if keyed && std::time::Instant::now() + pause < give_up =>
                {
                    tracing::debug!(error = %e, "start failed; sending it again with the same key");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                // Coordinators listen per flow: nobody listening on this
                // flow's subject means no coordinator serves it (or none runs).
                Err(ClientError::NoCoordinator { reason, .. })
                    if reason == "no coordinator is listening" =>
                {
                    return Err(ClientError::Rejected {
                        kind: Rejection::UnknownFlow,
                        message: format!(
                            "no coordinator serves flow `{flow}` (no worker registered it, no coordinator is running, or they use another subject prefix; `orchestrix flows list` shows the flows served)"
                        ),
                    });
                }
                Err(ClientError::NoCoordinator { subject, reason }) if !keyed => {
                    return Err(ClientError::NoCoordinator {
                        subject,
                        reason: format!(
                            "{reason}; a run may have started if a coordinator got the request in time (`orchestrix list` shows it; one that gets it later refuses it); start with an idempotency key to have starts retried safely"
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How long a start with an idempotency key is sent again while no
    /// coordinator answers or its store is unavailable (default 30 s).
    #[must_use]
    pub fn start_retry_for(mut self, d: Duration) -> Self {
        self.start_retry_for = d;
        self
    }

    /// The report of a run so far (`status` is `running` while it is live).
    pub async fn status(&self, run_id: RunId) -> Result<RunReport, ClientError> {
        let run_id = run_id.as_uuid();
        let req = StatusRequest { run_id, wait: false };
        match self.ask(self.subjects.status_requests(), &req, Some(self.request_timeout)).await? {
            RunReply::Report(report) => Ok(*report),
            other => Err(unexpected(other)),
        }
    }

    /// Waits for the final report of a run started earlier. If the
    /// coordinator answering dies meanwhile, the wait goes on with another:
    /// every [`WAIT_LOOK_EVERY`] the client also asks whether the run ended,
    /// so that it learns of an end elsewhere within that time, not when its
    /// wait (30 s) runs out.
    ///
    /// A run no coordinator knows is waited for [`TAKEOVER_GRACE`] before
    /// the wait ends with [`Rejection::UnknownRun`]: its coordinator may
    /// have died before its first checkpoint, and another be taking it over.
    /// A store that cannot answer ([`ClientError::Unavailable`]: a NATS
    /// node failing over, say) is asked again for up to
    /// [`UNAVAILABLE_PATIENCE`] before the wait ends with that error.
    pub async fn wait(&self, run_id: RunId) -> Result<RunReport, ClientError> {
        let run_id = run_id.as_uuid();
        let mut unknown_since = None;
        let mut unavailable_since = None;
        loop {
            let req = StatusRequest { run_id, wait: true };
            let waiting =
                self.ask(self.subjects.status_requests(), &req, Some(Duration::from_secs(30)));
            tokio::pin!(waiting);
            let mut look = tokio::time::interval_at(
                tokio::time::Instant::now() + WAIT_LOOK_EVERY,
                WAIT_LOOK_EVERY,
            );
            let answer = loop {
                tokio::select! {
                    answer = &mut waiting => break answer,
                    _ = look.tick() => {
                        let now = StatusRequest { run_id, wait: false };
                        let status = self.subjects.status_requests();
                        if let Ok(RunReply::Report(report)) =
                            self.ask(status, &now, Some(self.request_timeout)).await
                            && report.status.is_terminal()
                        {
                            return Ok(*report);
                        }
                    }
                }
            };
            match answer {
                Ok(RunReply::Report(report)) => return Ok(*report),
                Ok(other) => return Err(unexpected(other)),
                // Nobody answered in time: a long run, or a coordinator restarting.
                Err(ClientError::NoCoordinator { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e)
                    if e.rejection() == Some(Rejection::UnknownRun)
                        && unknown_since.get_or_insert_with(Instant::now).elapsed()
                            < TAKEOVER_GRACE =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(ClientError::Unavailable(_))
                    if unavailable_since.get_or_insert_with(Instant::now).elapsed()
                        < UNAVAILABLE_PATIENCE =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Recent runs, newest first, that pass `filter` (as
    /// `Coordinator::list` takes it).
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<RunReport>, ClientError> {
        let limit = u32::try_from(filter.limit).unwrap_or(u32::MAX);
        let before = filter.before.map(|b| b.as_uuid());
        let req = orchestrix_proto::ListRequest {
            status: filter.status,
            flow: filter.flow,
            limit,
            before,
        };
        match self.ask(self.subjects.list_requests(), &req, Some(self.request_timeout)).await? {
            RunReply::List(runs) => Ok(runs),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels a run: the coordinator running it stops the attempt in
    /// flight, compensates the completed steps in reverse, and ends the run
    /// `cancelled` with `by` and `reason` in its report. Returns once the
    /// cancel is accepted (wait for the report with [`Client::wait`]).
    /// Cancelling a finished run is an error; cancelling twice is harmless.
    pub async fn cancel(
        &self,
        run_id: RunId,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.control(run_id, orchestrix_proto::ControlAction::Cancel, by, reason).await
    }

    /// Resumes a paused run: its paused step (or compensation) is tried
    /// again with a fresh budget of attempts.
    pub async fn resume(&self, run_id: RunId, by: &str) -> Result<(), ClientError> {
        self.control(run_id, orchestrix_proto::ControlAction::Resume, by, None).await
    }

    /// Rolls a paused run back: its paused step fails for good (a paused
    /// compensation counts as failed) and the rollback goes on.
    pub async fn rollback(&self, run_id: RunId, by: &str) -> Result<(), ClientError> {
        self.control(run_id, orchestrix_proto::ControlAction::Rollback, by, None).await
    }

    /// Applies an operator's action to a live run (see [`Client::cancel`],
    /// [`Client::resume`], [`Client::rollback`]).
    pub async fn control(
        &self,
        run_id: RunId,
        action: orchestrix_proto::ControlAction,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        let run_id = run_id.as_uuid();
        let req = orchestrix_proto::ControlRequest {
            run_id,
            action,
            by: by.to_owned(),
            reason: reason.map(str::to_owned),
        };
        let subject = self.subjects.control_requests();
        match self.ask(subject, &req, Some(self.request_timeout)).await {
            Ok(RunReply::Accepted { .. }) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            // Nobody listens at all: say so (a wrong prefix, no coordinator).
            Err(e @ ClientError::NoCoordinator { .. })
                if e.to_string().contains("no coordinator is listening") =>
            {
                Err(e)
            }
            Err(ClientError::NoCoordinator { .. }) => Err(ClientError::Unavailable(format!(
                "no coordinator has run {run_id} live right now (it may be being taken over; try again in a few seconds)"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Follows a run's lifecycle events (published by a coordinator with an
    /// `EventPublisher`, as `orchestrix serve` does) as they happen.
    /// Subscribe before asking for the run's status, so nothing is missed.
    pub async fn watch(
        &self,
        run_id: RunId,
    ) -> Result<impl futures::Stream<Item = orchestrix_proto::RunEvent> + use<>, ClientError> {
        self.watch_subject(self.subjects.events(&run_id.as_uuid())).await
    }

    /// The events of every run, live, from now on (see [`Client::watch`]).
    pub async fn watch_all(
        &self,
    ) -> Result<impl futures::Stream<Item = orchestrix_proto::RunEvent> + use<>, ClientError> {
        self.watch_subject(self.subjects.all_events()).await
    }

    async fn watch_subject(
        &self,
        subject: String,
    ) -> Result<impl futures::Stream<Item = orchestrix_proto::RunEvent> + use<>, ClientError> {
        use futures::StreamExt;
        let sub = self
            .nats
            .subscribe(subject.clone())
            .await
            .map_err(|e| ClientError::NoCoordinator { subject, reason: e.to_string() })?;
        orchestrix_worker::sync(&self.nats).await;
        Ok(sub.filter_map(|m| async move { decode::<orchestrix_proto::RunEvent>(&m.payload).ok() }))
    }

    async fn ask<M: Message>(
        &self,
        subject: String,
        msg: &M,
        timeout: Option<Duration>,
    ) -> Result<RunReply, ClientError> {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MESSAGE_KIND, M::KIND);
        // A traced caller's span becomes the parent of the run's.
        if let Some(tp) = orchestrix_worker::current_traceparent() {
            h.insert(headers::TRACEPARENT, tp.as_str());
        }
        let body = encode(msg)?;
        // Over the server's limit, NATS would drop the connection's request
        // with an error that reads like a missing coordinator: say what it is.
        // (Small requests skip the check: reading the server's info clones it.)
        let limit = if body.len() > 64 * 1024 { self.nats.server_info().max_payload } else { 0 };
        if limit > 0 && body.len() > limit {
            return Err(ClientError::Rejected {
                kind: Rejection::BadInput,
                message: format!(
                    "the request is {} bytes (its input, mostly); the NATS server takes messages of at most {limit} bytes",
                    body.len()
                ),
            });
        }
        let request =
            async_nats::Request::new().payload(Bytes::from(body)).headers(h).timeout(timeout);
        // The server refuses at once (a -ERR on the connection) but the
        // request would only time out: watch for the refusal meanwhile.
        let seen = orchestrix_worker::permission_violations(&self.nats).len();
        let inbox = self.nats.new_inbox();
        let inbox_prefix = inbox.rsplit_once('.').map_or(inbox.as_str(), |(p, _)| p);
        let inbox_prefix = inbox_prefix.split('.').next().unwrap_or(inbox_prefix).to_owned();
        let refusal = async {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(why) = self.refusal(&subject, &inbox_prefix, seen) {
                    return why;
                }
            }
        };
        let sent = self.nats.send_request(subject.clone(), request);
        let answer = tokio::select! {
            answer = sent => answer,
            why = refusal => return Err(ClientError::Permission(why)),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                if let Some(why) = self.refusal(&subject, &inbox_prefix, seen) {
                    return Err(ClientError::Permission(why));
                }
                let reason = match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        "no coordinator is listening".into()
                    }
                    async_nats::RequestErrorKind::TimedOut => "no answer in time".into(),
                    _ => e.to_string(),
                };
                return Err(ClientError::NoCoordinator { subject, reason });
            }
        };
        match decode::<RunReply>(&answer.payload)? {
            RunReply::Rejected { error, retryable: true, .. } => {
                Err(ClientError::Unavailable(error))
            }
            RunReply::Rejected { error, code, .. } => {
                Err(ClientError::Rejected { kind: Rejection::from_code(&code), message: error })
            }
            reply => Ok(reply),
        }
    }
}

impl Client {
    /// A permission violation the server reported since the first `seen`
    /// that concerns a request to `subject`: publishing it, or receiving
    /// replies (a reply prefix the user may not subscribe to).
    fn refusal(&self, subject: &str, inbox_prefix: &str, seen: usize) -> Option<String> {
        let all = orchestrix_worker::permission_violations(&self.nats);
        let new = all.get(seen..).unwrap_or_default();
        if let Some(v) = new.iter().find(|v| v.contains(&format!("\"{subject}\""))) {
            return Some(v.clone());
        }
        // A refused reply subscription stays refused for the connection's life.
        let v = all
            .iter()
            .find(|v| v.contains("Subscription to") && v.contains(&format!("\"{inbox_prefix}")))?;
        Some(format!(
            "{v}: the server gives each user its own reply prefix; set NATS_INBOX_PREFIX=_INBOX_<user> (--inbox-prefix, NatsOptions::inbox_prefix). A request sent meanwhile may have been carried out (a run started)"
        ))
    }
}

fn run_request(flow: &str, input: Payload, options: RunOptions, wait: bool) -> RunRequest {
    let RunOptions { key, ttl, timeout, version, concurrency_key, .. } = options;
    RunRequest { version, key, ttl, timeout, wait, concurrency_key, ..RunRequest::new(flow, input) }
}

fn unexpected(reply: RunReply) -> ClientError {
    ClientError::Unexpected(match reply {
        RunReply::Accepted { run_id, .. } => format!("accepted run {run_id}"),
        RunReply::Report(r) => format!("a report of run {}", r.run_id),
        RunReply::List(l) => format!("a list of {} runs", l.len()),
        RunReply::Rejected { error, .. } => error,
    })
}

impl Client {
    /// A typed handle on one flow: `client.flow::<PaymentInput>("payment-flow").run(input)`.
    pub fn flow<I: Serialize>(&self, name: &str) -> RemoteFlow<I> {
        RemoteFlow {
            client: self.clone(),
            name: name.to_owned(),
            version: None,
            _input: PhantomData,
        }
    }
}

/// A flow run through a [`Client`], typed by its input, with the calls of an
/// embedded flow (`run`, `run_with`, `start`).
pub struct RemoteFlow<I> {
    client: Client,
    name: String,
    version: Option<String>,
    _input: PhantomData<fn(I)>,
}

impl<I> Clone for RemoteFlow<I> {
    fn clone(&self) -> Self {
        RemoteFlow {
            client: self.client.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            _input: PhantomData,
        }
    }
}

impl<I> fmt::Debug for RemoteFlow<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteFlow")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<I: Serialize> RemoteFlow<I> {
    /// Runs this version of the flow only (default: the newest one a live worker serves).
    #[must_use]
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn options(&self, mut options: RunOptions) -> RunOptions {
        if options.version.is_none() {
            options.version = self.version.clone();
        }
        options
    }

    /// Runs the flow and waits for its report.
    pub async fn run(&self, input: I) -> Result<RunReport, ClientError> {
        self.run_with(input, RunOptions::new()).await
    }

    /// Runs the flow with options (idempotency key, deadline) and waits for its report.
    pub async fn run_with(&self, input: I, options: RunOptions) -> Result<RunReport, ClientError> {
        self.client.run(&self.name, &input, self.options(options)).await
    }

    /// Starts a run and returns its id at once.
    pub async fn start(&self, input: I, options: RunOptions) -> Result<RunId, ClientError> {
        self.client.start(&self.name, &input, self.options(options)).await
    }
}
