use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix_proto::{
    Ack, Acks, DEFAULT_MAX_MESSAGE_BYTES, Heartbeat, Message, OutcomeResult, StepCommand,
    StepFailure, StepOutcome, Subjects, WireError, decode_ids, decode_with_limit, encode, headers,
    peek_kind,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::bus::{Bus, BusError, BusReply, Dispatched, Liveness, ReplyTo};

/// Timeouts and limits of the NATS bus.
#[derive(Debug, Clone)]
#[non_exhaustive]
#[must_use]
pub struct NatsBusOptions {
    /// Subject prefix shared with the workers.
    pub subjects: Subjects,
    /// Time for a worker to acknowledge a command (default 2 s).
    pub ack_timeout: Duration,
    /// Longest silence of a worker holding a command (default 5 s; workers
    /// heartbeat every second by default).
    pub heartbeat_timeout: Duration,
    /// Slack after a step's timeout before the coordinator gives up on its worker (default 1 s).
    pub timeout_grace: Duration,
    /// Largest reply accepted, in bytes.
    pub max_message_bytes: usize,
    /// How far apart hosts' clocks may be (default 500 ms): a command no
    /// worker acked is sent again `ack_timeout + clock_skew` after it left.
    pub clock_skew: Duration,
    /// How long an attempt may wait for a worker to take it before its step
    /// fails (default 5 min): runs ride out a redeploy of their workers.
    pub worker_wait: Duration,
}

impl Default for NatsBusOptions {
    fn default() -> Self {
        NatsBusOptions {
            subjects: Subjects::default(),
            ack_timeout: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(5),
            timeout_grace: Duration::from_secs(1),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            clock_skew: Duration::from_millis(500),
            worker_wait: Duration::from_secs(300),
        }
    }
}

impl NatsBusOptions {
    /// Sets the subjects (prefix).
    pub fn subjects(mut self, subjects: Subjects) -> Self {
        self.subjects = subjects;
        self
    }

    /// Sets the ack timeout.
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }

    /// Sets the heartbeat timeout.
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.heartbeat_timeout = d;
        self
    }

    /// Sets the grace after a step's timeout.
    pub fn timeout_grace(mut self, d: Duration) -> Self {
        self.timeout_grace = d;
        self
    }

    /// Sets the clock skew allowed between hosts.
    pub fn clock_skew(mut self, d: Duration) -> Self {
        self.clock_skew = d;
        self
    }

    /// Sets how long an attempt may wait for a worker.
    pub fn worker_wait(mut self, d: Duration) -> Self {
        self.worker_wait = d;
        self
    }
}

type Routes = Arc<Mutex<HashMap<Uuid, ReplyTo, foldhash::fast::RandomState>>>;

/// Step commands over NATS: published on each step's subject, where workers
/// share them in a queue group; acks, heartbeats and outcomes come back on this
/// coordinator's own reply subject and are routed to the run's actor.
pub struct NatsBus {
    client: async_nats::Client,
    options: NatsBusOptions,
    reply_subject: async_nats::Subject,
    routes: Routes,
    outbox: mpsc::UnboundedSender<Outgoing>,
    unrouted: Mutex<Option<mpsc::Receiver<StepOutcome>>>,
    tasks: [JoinHandle<()>; 2],
}

/// A command on its way to NATS, and where to report a failed publish.
struct Outgoing {
    subject: String,
    bytes: Bytes,
    reply: ReplyTo,
    command_id: Uuid,
    /// Told once the message is in the client's hands.
    handed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("reply_subject", &self.reply_subject)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NatsBus {
    /// Subscribes to this coordinator's reply subject and starts routing
    /// replies. Call from within a tokio runtime.
    pub async fn start(
        client: async_nats::Client,
        options: NatsBusOptions,
    ) -> Result<Self, BusError> {
        let id = Uuid::new_v4().simple().to_string();
        let reply_subject = async_nats::Subject::from(options.subjects.replies(&id[..12]));
        let sub = client.subscribe(reply_subject.clone()).await.map_err(|e| {
            BusError::Unavailable(format!("cannot subscribe to {reply_subject}: {e}"))
        })?;
        let routes: Routes = Arc::default();
        let (late_tx, late_rx) = mpsc::channel(1024);
        let router = tokio::spawn(route(sub, routes.clone(), options.max_message_bytes, late_tx));
        let (outbox, rx) = mpsc::unbounded_channel();
        let publisher = tokio::spawn(publish(client.clone(), reply_subject.clone(), rx));
        orchestrix_worker::sync(&client).await;
        Ok(NatsBus {
            client,
            options,
            reply_subject,
            routes,
            outbox,
            unrouted: Mutex::new(Some(late_rx)),
            tasks: [router, publisher],
        })
    }

    /// The subject workers answer on.
    pub fn reply_subject(&self) -> &str {
        &self.reply_subject
    }
}

impl NatsBus {
    fn send(
        &self,
        subject: String,
        mut cmd: StepCommand,
        reply: &ReplyTo,
        handed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), BusError> {
        // This coordinator reads `step.acks`.
        cmd.acks = true;
        // The run's trace context (its attempt's span), when a tracer runs
        // here, in the command's body: a header would cost every client that
        // receives it a parse into a map (a few thousand instructions), and
        // the server its slower path for messages with headers. A run the
        // sampler left out only says so; with no tracer, nothing: a worker
        // correlates a run's spans by its id itself.
        match crate::telemetry::sending_traceparent() {
            Some(tp) if tp.sampled => cmd.traceparent = Some(tp.to_header()),
            Some(_) => cmd.sampled = Some(false),
            None => {}
        }
        let cmd = &cmd;
        let bytes = encode(cmd).map_err(|e| BusError::Rejected(e.to_string()))?;
        let max = self.client.max_payload().min(self.options.max_message_bytes);
        if bytes.len() > max {
            return Err(BusError::Rejected(format!(
                "the command is {} bytes, more than the {max} bytes NATS accepts (large inputs or outputs belong in a store, passed by reference)",
                bytes.len()
            )));
        }
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(cmd.run_id, reply.clone());
        // One publisher task drains the outbox: no task per command, and the
        // actor never waits on the client's channel.
        let out = Outgoing {
            subject,
            bytes: Bytes::from(bytes),
            reply: reply.clone(),
            command_id: cmd.command_id,
            handed,
        };
        self.outbox.send(out).map_err(|_| BusError::Unavailable("the NATS bus has stopped".into()))
    }
}

impl Bus for NatsBus {
    fn dispatch(&self, cmd: StepCommand, reply: &ReplyTo) -> Result<Dispatched, BusError> {
        let subject = self.options.subjects.step(&cmd.flow, &cmd.version, &cmd.step);
        self.send(subject, cmd, reply, None).map(|()| Dispatched::Sent)
    }

    fn inquire(&self, cmd: StepCommand, reply: &ReplyTo) -> Result<(), BusError> {
        let subject = self.options.subjects.inquiries(&cmd.flow, &cmd.step);
        // Answered by the server itself (JetStream's account info, or "no
        // responders" where JetStream is off), which no subscriber can
        // swallow, and which every coordinator may ask.
        let probe = "$JS.API.INFO";
        let command_id = cmd.command_id;
        let (handed, ordered) = tokio::sync::oneshot::channel();
        self.send(subject, cmd, reply, Some(handed))?;
        // A request the server answers, after the inquiry on the same
        // connection: its answer comes back once the server has handled
        // both (it handles a connection's messages in order). With the
        // server unreachable it is asked again until it answers, for as
        // long as the run waits.
        let (client, reply) = (self.client.clone(), reply.clone());
        tokio::spawn(async move {
            // Once the inquiry is in the client's hands: the request goes
            // after it on the connection.
            if ordered.await.is_err() {
                return;
            }
            while reply.is_connected() {
                match client.request(probe, Bytes::new()).await {
                    Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                        warn!(%command_id, subject = %probe, "the NATS server did not answer: the inquiry's window opens once it does");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // An answer, or "no responders"; a client that closed
                    // ends the run anyway.
                    _ => break,
                }
            }
            reply.deliver(BusReply::Reached { command_id });
        });
        Ok(())
    }

    fn confirms_inquiries(&self) -> bool {
        true
    }

    fn cancel(&self, cmd: &StepCommand) -> Result<(), BusError> {
        // On the inquiry subject: every replica hears it, the holder stops.
        let msg = orchestrix_proto::StepCancel {
            command_id: cmd.command_id,
            run_id: cmd.run_id,
            attempt: cmd.attempt,
        };
        let bytes = encode(&msg).map_err(|e| BusError::Rejected(e.to_string()))?;
        let subject = self.options.subjects.inquiries(&cmd.flow, &cmd.step);
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.publish(subject, Bytes::from(bytes)).await {
                tracing::warn!(error = %e, "cannot publish a step cancel");
            }
        });
        Ok(())
    }

    fn liveness(&self) -> Liveness {
        Liveness::Remote {
            ack_timeout: self.options.ack_timeout,
            heartbeat_timeout: self.options.heartbeat_timeout,
            timeout_grace: self.options.timeout_grace,
            clock_skew: self.options.clock_skew,
            worker_wait: self.options.worker_wait,
        }
    }

    fn take_unrouted(&self) -> Option<mpsc::Receiver<StepOutcome>> {
        self.unrouted.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn run_finished(&self, run_id: Uuid) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&run_id);
    }
}

async fn publish(
    client: async_nats::Client,
    reply_subject: async_nats::Subject,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let reply = reply_subject.clone();
        let sent = client.publish_with_reply(out.subject, reply, out.bytes).await;
        if let Err(e) = sent {
            out.reply.deliver(BusReply::DispatchFailed {
                command_id: out.command_id,
                message: format!("cannot publish the step command: {e}"),
            });
        }
        if let Some(handed) = out.handed {
            let _ = handed.send(());
        }
    }
}

/// Decodes each reply and hands it to its run. Bad replies are logged and dropped.
async fn route(
    mut sub: async_nats::Subscriber,
    routes: Routes,
    max: usize,
    late: mpsc::Sender<StepOutcome>,
) {
    while let Some(msg) = sub.next().await {
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // The server's word that no worker serves a command's subject
            // right now: the command waits for one (the ack window and the
            // worker wait decide), nothing to decode.
            debug!(subject = %msg.subject, "a step command found no worker subscribed");
            continue;
        }
        let kind = match msg.headers.as_ref().and_then(|h| h.get(headers::MESSAGE_KIND)) {
            Some(k) => k.as_str().to_owned(),
            None => match peek_kind(&msg.payload) {
                Ok((_, kind)) => kind,
                Err(e) => {
                    warn!(error = %e, "unreadable reply dropped");
                    continue;
                }
            },
        };
        if kind == Acks::KIND {
            match decode_with_limit::<Acks>(&msg.payload, max) {
                Ok(acks) => {
                    let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                    for ack in acks.acks() {
                        match routes.get(&ack.run_id) {
                            Some(to) => to.deliver(BusReply::Ack(ack)),
                            None => {
                                debug!(run_id = %ack.run_id, "ack for a run that is not live here")
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "bad reply dropped"),
            }
            continue;
        }
        let reply = match kind.as_str() {
            Ack::KIND => {
                decode_with_limit::<Ack>(&msg.payload, max).map(|a| (a.run_id, BusReply::Ack(a)))
            }
            Heartbeat::KIND => decode_with_limit::<Heartbeat>(&msg.payload, max)
                .map(|h| (h.run_id, BusReply::Heartbeat(h))),
            StepOutcome::KIND => match decode_with_limit::<StepOutcome>(&msg.payload, max) {
                Ok(o) => Ok((o.run_id, BusReply::Outcome(o))),
                // A worker answered with something unreadable (an output that
                // is not a MessagePack `bin`, say): the attempt fails with the
                // reason rather than going silent. The handler ran: maybe done.
                Err(e) => match decode_ids(&msg.payload, StepOutcome::KIND, max) {
                    Some(ids) => Ok((
                        ids.run_id,
                        BusReply::Outcome(StepOutcome {
                            command_id: ids.command_id,
                            run_id: ids.run_id,
                            attempt: ids.attempt,
                            kind: ids.kind.unwrap_or(orchestrix_proto::CommandKind::Execute),
                            result: OutcomeResult::Failed(StepFailure {
                                message: format!("the worker's outcome does not decode: {e}"),
                                retryable: false,
                                maybe_done: true,
                            }),
                        }),
                    )),
                    None => Err(e),
                },
            },
            WireError::KIND => match decode_with_limit::<WireError>(&msg.payload, max) {
                Ok(e) => match e.run_id {
                    Some(run_id) if e.command_id.is_some() => Ok((run_id, BusReply::Rejected(e))),
                    _ => {
                        warn!(error = %e.message, code = %e.code, "a worker rejected a message");
                        continue;
                    }
                },
                Err(e) => Err(e),
            },
            other => {
                warn!(kind = other, "reply of unknown kind dropped");
                continue;
            }
        };
        match reply {
            Ok((run_id, reply)) => {
                let to = routes.lock().unwrap_or_else(|p| p.into_inner()).get(&run_id).cloned();
                match to {
                    Some(to) => to.deliver(reply),
                    // An outcome for a run that ended meanwhile: the
                    // coordinator notes it in the run's history.
                    None => match reply {
                        BusReply::Outcome(o) => {
                            let _ = late.try_send(o);
                        }
                        _ => debug!(%run_id, "reply for a run that is not live here"),
                    },
                }
            }
            Err(e) => warn!(error = %e, "bad reply dropped"),
        }
    }
}
