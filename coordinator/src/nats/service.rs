use std::fmt;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix_proto::{
    ControlRequest, DEFAULT_MAX_MESSAGE_BYTES, Message, RunReply, RunRequest, StatusRequest,
    Subjects, decode_with_limit, encode, headers,
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::{Coordinator, RunError, RunOptions};

/// The service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A subscription was refused.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// Answers run and status requests on NATS with a [`Coordinator`].
///
/// Coordinators share the requests in a queue group, so several instances
/// split the runs between them.
pub struct Service {
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const QUEUE_GROUP: &str = "orchestrix-coordinators";

impl Service {
    /// Subscribes to the run and status subjects of `subjects` and serves them
    /// until dropped. Call from within a tokio runtime.
    pub async fn start(
        coordinator: Coordinator,
        client: async_nats::Client,
        subjects: &Subjects,
    ) -> Result<Service, ServiceError> {
        let mut tasks = Vec::new();
        // Run requests per flow: a coordinator only hears the flows it serves,
        // so coordinators serving different flows share one NATS. Status and
        // list are answered from the shared store by any of them.
        let mut asks: Vec<(String, Ask)> =
            coordinator.flows().iter().map(|f| (subjects.run_requests(f), Ask::Run)).collect();
        asks.push((subjects.status_requests(), Ask::Status));
        asks.push((subjects.list_requests(), Ask::List));
        for (subject, kind) in asks {
            tasks.push(listen(&coordinator, &client, subject, kind).await?);
        }
        // Every coordinator hears operators' actions (no queue group): the
        // one running the run applies it and answers.
        let subject = subjects.control_requests();
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| ServiceError::Subscribe { subject, source })?;
        tasks.push(tokio::spawn(serve(sub, coordinator.clone(), client.clone(), Ask::Control)));
        // Every coordinator hears its peers' status questions too, and
        // answers only for runs it knows.
        let subject = subjects.status_peer_requests();
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| ServiceError::Subscribe { subject, source })?;
        tasks.push(tokio::spawn(serve(sub, coordinator.clone(), client.clone(), Ask::Peer)));
        // Flows registered later are heard from when this coordinator sees them.
        if let Some(mut changed) = coordinator.registry().map(|r| r.changes()) {
            let (coordinator, client, subjects) =
                (coordinator.clone(), client.clone(), subjects.clone());
            let mut heard: std::collections::HashSet<_> = coordinator.flows().into_iter().collect();
            tasks.push(tokio::spawn(async move {
                let mut serving = Vec::new();
                while changed.changed().await.is_ok() {
                    for flow in coordinator.flows() {
                        if heard.contains(&flow) {
                            continue;
                        }
                        let subject = subjects.run_requests(&flow);
                        match listen(&coordinator, &client, subject, Ask::Run).await {
                            Ok(task) => {
                                heard.insert(flow);
                                serving.push(AbortOnDrop(task));
                            }
                            Err(e) => {
                                warn!(error = %e, "cannot serve a registered flow; will retry")
                            }
                        }
                    }
                }
            }));
        }
        orchestrix_worker::sync(&client).await;
        Ok(Service { tasks })
    }
}

/// Subscribes to `subject` in the coordinators' queue group and answers it.
async fn listen(
    coordinator: &Coordinator,
    client: &async_nats::Client,
    subject: String,
    kind: Ask,
) -> Result<JoinHandle<()>, ServiceError> {
    let sub = client
        .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
        .await
        .map_err(|source| ServiceError::Subscribe { subject, source })?;
    Ok(tokio::spawn(serve(sub, coordinator.clone(), client.clone(), kind)))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, Copy)]
enum Ask {
    Run,
    Status,
    List,
    Control,
    /// Another coordinator's status question.
    Peer,
}

async fn serve(
    mut sub: async_nats::Subscriber,
    coordinator: Coordinator,
    client: async_nats::Client,
    kind: Ask,
) {
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            warn!(subject = %msg.subject, "request without a reply subject dropped");
            continue;
        };
        let (coordinator, client) = (coordinator.clone(), client.clone());
        tokio::spawn(async move {
            let answer = match kind {
                Ask::Run => {
                    let tp = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::TRACEPARENT))
                        .map(|v| v.as_str().to_owned());
                    answer_run(&coordinator, &msg.subject, &msg.payload, tp).await
                }
                Ask::Status => {
                    let peers = format!("{}.peers", msg.subject);
                    match answer_status(&coordinator, &msg.payload).await {
                        Some(answer) => answer,
                        None => ask_peers(&client, peers, msg.payload.clone())
                            .await
                            .unwrap_or_else(|| {
                                let id = decode_with_limit::<StatusRequest>(
                                    &msg.payload,
                                    DEFAULT_MAX_MESSAGE_BYTES,
                                )
                                .map(|r| r.run_id)
                                .unwrap_or_default();
                                unknown_run(id)
                            }),
                    }
                }
                Ask::Peer => match answer_status(&coordinator, &msg.payload).await {
                    Some(answer @ RunReply::Report(_)) => answer,
                    _ => return,
                },
                Ask::List => answer_list(&coordinator, &msg.payload).await,
                Ask::Control => match answer_control(&coordinator, &msg.payload).await {
                    Some(answer) => answer,
                    // Not live here: the coordinator running it answers.
                    None => return,
                },
            };
            if let RunReply::Rejected { error, .. } = &answer {
                debug!(%error, "request rejected");
            }
            match encode(&answer) {
                Ok(bytes) => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(headers::MESSAGE_KIND, RunReply::KIND);
                    if let Err(e) = client.publish_with_headers(reply, h, Bytes::from(bytes)).await
                    {
                        warn!(error = %e, "cannot send a reply");
                    }
                }
                Err(e) => warn!(error = %e, "cannot encode a reply"),
            }
        });
    }
}

fn bad_request(error: impl fmt::Display) -> RunReply {
    RunReply::rejected(RunReply::CODE_BAD_REQUEST, error)
}

fn unknown_run(run_id: uuid::Uuid) -> RunReply {
    RunReply::rejected(RunReply::CODE_UNKNOWN_RUN, format!("unknown run {run_id}"))
}

fn run_rejected(error: RunError) -> RunReply {
    use crate::StoreError;
    let code = match &error {
        RunError::UnknownFlow(_) => RunReply::CODE_UNKNOWN_FLOW,
        RunError::UnknownVersion { .. } => RunReply::CODE_UNKNOWN_VERSION,
        RunError::Store(StoreError::NotFound(_)) | RunError::NotLive(_) => {
            RunReply::CODE_UNKNOWN_RUN
        }
        RunError::Store(e) if !e.is_permanent() => RunReply::CODE_UNAVAILABLE,
        RunError::Input(_)
        | RunError::InputTooLarge { .. }
        | RunError::BadInput(_)
        | RunError::InputMismatch { .. } => RunReply::CODE_BAD_INPUT,
        RunError::BadOption(_) | RunError::InvalidFlow(_) => RunReply::CODE_BAD_REQUEST,
        RunError::Refused(_) => RunReply::CODE_REFUSED,
        _ => RunReply::CODE_OTHER,
    };
    RunReply::rejected(code, error)
}

async fn answer_run(
    coordinator: &Coordinator,
    subject: &str,
    payload: &[u8],
    traceparent: Option<String>,
) -> RunReply {
    let req = match decode_with_limit::<RunRequest>(payload, DEFAULT_MAX_MESSAGE_BYTES) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bad run request");
            return bad_request(format!("bad run request: {e}"));
        }
    };
    // NATS permissions grant a client the subjects of its flows: the flow the
    // body names must be the subject's, or a client of one flow could start
    // any other by naming it.
    let on = subject.rsplit_once('.').map_or(subject, |(_, flow)| flow);
    if on != req.flow {
        warn!(%subject, flow = %req.flow, "run request for another flow than its subject's; refused");
        return bad_request(format!(
            "the request names flow `{}` but was sent on `{subject}`: a start goes on the subject of its own flow",
            req.flow
        ));
    }
    let now = orchestrix_proto::time::unix_ms(std::time::SystemTime::now());
    if let Some(by) = req.start_by_ms.filter(|by| now > *by) {
        // The caller has given up on this answer: starting the run now would
        // make one it was told failed.
        warn!(late_ms = now - by, flow = %req.flow, "run request arrived after its caller gave up; refused");
        return bad_request(format!(
            "run request expired {} ms ago (the caller gave up)",
            now - by
        ));
    }
    let mut options = RunOptions::with(req.key, req.ttl, req.timeout, req.version);
    options.concurrency_key = req.concurrency_key;
    options.traceparent = traceparent;
    let handle = match coordinator.start_payload(&req.flow, req.input, options).await {
        Ok(h) => h,
        Err(e) => return run_rejected(e),
    };
    if !req.wait {
        return RunReply::Accepted {
            run_id: handle.run_id().into(),
            duplicate: handle.is_duplicate(),
        };
    }
    match handle.report().await {
        Ok(report) => RunReply::Report(Box::new(report)),
        Err(e) => run_rejected(e),
    }
}

/// How long a coordinator that does not know a run waits for a peer that does.
const PEER_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Asks the other coordinators about a run this one does not know: the
/// one that drives it answers (it may hold it in its journal only).
async fn ask_peers(
    client: &async_nats::Client,
    subject: String,
    payload: Bytes,
) -> Option<RunReply> {
    let answer =
        tokio::time::timeout(PEER_WAIT, client.request(subject, payload)).await.ok()?.ok()?;
    match orchestrix_proto::decode_with_limit::<RunReply>(&answer.payload, usize::MAX) {
        Ok(r @ RunReply::Report(_)) => Some(r),
        _ => None,
    }
}

/// `None` when this coordinator does not know the run (and was not asked
/// to wait for it): another may.
async fn answer_status(coordinator: &Coordinator, payload: &[u8]) -> Option<RunReply> {
    let req = match decode_with_limit::<StatusRequest>(payload, DEFAULT_MAX_MESSAGE_BYTES) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bad status request");
            return Some(bad_request(format!("bad status request: {e}")));
        }
    };
    let result: Result<Option<_>, RunError> = if req.wait {
        coordinator.wait(req.run_id.into()).await.map(Some).or_else(|e| match e {
            RunError::Store(crate::StoreError::NotFound(_)) => Ok(None),
            e => Err(e),
        })
    } else {
        coordinator.status(req.run_id.into()).await
    };
    match result {
        Ok(Some(report)) => Some(RunReply::Report(Box::new(report))),
        Ok(None) if req.wait => Some(unknown_run(req.run_id)),
        Ok(None) => None,
        Err(e) => Some(run_rejected(e)),
    }
}

/// `None` when the run is live elsewhere: its coordinator answers.
async fn answer_control(coordinator: &Coordinator, payload: &[u8]) -> Option<RunReply> {
    let req = match decode_with_limit::<ControlRequest>(payload, DEFAULT_MAX_MESSAGE_BYTES) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bad control request");
            return Some(bad_request(format!("bad control request: {e}")));
        }
    };
    let action = orchestrix_proto::OperatorAction {
        action: req.action,
        by: req.by,
        reason: req.reason,
        at: std::time::SystemTime::now(),
    };
    match coordinator.control(req.run_id, action).await {
        Ok(()) => Some(RunReply::Accepted { run_id: req.run_id, duplicate: false }),
        Err(RunError::NotLive(_)) => None,
        Err(RunError::Store(crate::StoreError::NotFound(_))) => Some(unknown_run(req.run_id)),
        Err(e) => Some(run_rejected(e)),
    }
}

async fn answer_list(coordinator: &Coordinator, payload: &[u8]) -> RunReply {
    let req = match decode_with_limit::<orchestrix_proto::ListRequest>(
        payload,
        DEFAULT_MAX_MESSAGE_BYTES,
    ) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("bad list request: {e}")),
    };
    // 0 means the default (as `ListFilter` says), and replies must fit a
    // NATS message.
    let limit = if req.limit == 0 { 100 } else { (req.limit as usize).min(500) };
    let mut filter = crate::ListFilter::new(req.status, req.flow, limit);
    filter.before = req.before.map(Into::into);
    match coordinator.list(filter).await {
        Ok(runs) => RunReply::List(runs),
        Err(e) => run_rejected(e),
    }
}
