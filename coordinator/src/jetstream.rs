//! The durable store: runs, their history and idempotency keys in NATS
//! JetStream KV, so a coordinator that dies loses nothing.
//!
//! Buckets named after the subject prefix:
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `{prefix}_runs` | run id | the live run's record (MessagePack), as of its last checkpoint |
//! | `{prefix}_history` | run id | the final report; entries expire after the retention (bucket `max_age`) |
//! | `{prefix}_keys` | hex of the idempotency key | the run id, then its report; expires `ttl` after the run ended (per-key TTL, nats-server ≥ 2.11) |
//! | `{prefix}_coordinators` | coordinator id | a heartbeat, rewritten every second with a 3 s per-key TTL: the key exists while the coordinator lives |
//! | `{prefix}_slots` | a slot (`key.{flow}.{hex key}`, `step.{flow}.{step}`) | its holders and its queue (see [`crate::slots`]), changed by compare-and-set |
//!
//! **Ownership.** Each run record names the coordinator that owns it, and
//! every write of it is a compare-and-set on the record's revision. A
//! coordinator that finds a live run whose owner's heartbeat key has expired
//! claims it with a compare-and-set (one claimant wins) and resumes it, after
//! fencing the owner's journal (below). If the old owner was only cut off and
//! comes back, its next append finds the fence and it lets go of every run it
//! had ([`StoreError::Fenced`]); a checkpoint of a run claimed meanwhile fails
//! the compare-and-set the same way. A run is taken over within about 3 s
//! (heartbeat TTL) plus the scan interval (1 s in `orchestrix serve`).
//!
//! Plus one stream, `{prefix}_journal`, with a subject per coordinator:
//! its **run journal** (see the `journal` module). What a transition costs:
//! a share of one journal append. A single writer task puts the records of
//! every run that changed since its last append into one message, so at 64
//! runs in flight one acknowledged publish carries dozens of transitions
//! (group commit). A run's record reaches the runs bucket only when the run
//! has been live for a second or more (a checkpoint); a run that ends sooner
//! costs its journal shares, its history entry, and nothing else. The
//! journal is what a takeover reads first: before claiming a dead
//! coordinator's runs, the taker fences its subject (so it can append no
//! more), copies the newest record of each run in it to the runs bucket, and
//! only then claims them there.
//!
//! Writes are JetStream publishes acknowledged by the server (and, with
//! replicas, by a quorum) before the run moves on.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use orchestrix_proto::{RunReport, time};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ListFilter;
use crate::record::{Phase, RunRecord, Transition};
use crate::slots::{Grant, SlotState};
use crate::store::{ActorsHere, Created, Pending, Store, StoreError};

mod journal;

/// Where and how the JetStream store keeps its buckets.
#[derive(Debug, Clone)]
#[non_exhaustive]
#[must_use]
pub struct JetStreamStoreOptions {
    /// Prefix of the bucket names (default `orchestrix`).
    pub prefix: String,
    /// Replicas of each bucket: 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// How long finished runs' reports are kept (default 24 h).
    pub retention: Duration,
    /// Idempotency key lifetime after its run ended, when the run gave none (default 24 h).
    pub default_ttl: Duration,
}

impl Default for JetStreamStoreOptions {
    fn default() -> Self {
        JetStreamStoreOptions {
            prefix: "orchestrix".into(),
            replicas: 1,
            retention: Duration::from_secs(24 * 3600),
            default_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl JetStreamStoreOptions {
    /// Sets the bucket prefix (letters, digits, `-`, `_`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.replace('.', "_");
        self
    }

    /// Sets the replicas per bucket.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n.max(1);
        self
    }

    /// Sets how long finished runs are kept.
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }
}

/// Runs in JetStream KV. See the [module docs](self).
#[derive(Clone)]
pub struct JetStreamStore {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    runs: kv::Store,
    history: kv::Store,
    keys: kv::Store,
    keys_bucket: String,
    coordinators: kv::Store,
    quarantine: kv::Store,
    slots: kv::Store,
    /// Largest value the server takes.
    max_payload: usize,
    /// This coordinator's id, the owner named in the records it writes.
    id: String,
    /// The runs driven here (with their KV revisions) and the journal's state.
    shared: Arc<journal::Shared>,
    /// Hands records to the journal's writer task.
    appender: journal::Appender,
    /// The journal stream, and this coordinator's subject in it.
    journal: jetstream::stream::Stream,
    journal_subject: String,
    /// Journal messages below this sequence are purged.
    purged: std::sync::atomic::AtomicU64,
    /// Dead coordinators whose journals this one has taken over.
    done_journals: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Hands finished runs to the ender task.
    ender: tokio::sync::mpsc::UnboundedSender<Ending>,
    heartbeat: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    options: JetStreamStoreOptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.writer.abort();
    }
}

/// A run record with its owner, as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    owner: &'a str,
    record: &'a RunRecord,
}

/// A history entry: the final report (read as a plain `RunReport`) and, for
/// a run whose rollback failed, its record, so that the rollback can be
/// resumed.
#[derive(Serialize)]
struct HistoryEntry<'a> {
    #[serde(flatten)]
    report: &'a RunReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    reopen: Option<&'a RunRecord>,
}

/// A finished run on its way to the history.
struct Ending {
    after: Arc<RunRecord>,
    duration: Duration,
}

#[derive(Deserialize)]
struct Reopenable {
    reopen: Option<RunRecord>,
}

#[derive(Deserialize)]
struct Stored {
    owner: String,
    record: RunRecord,
}

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);

impl fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// An idempotency key's value.
#[derive(Serialize, Deserialize)]
struct KeyValue {
    run_id: Uuid,
    /// The run's report once it ended, and when the key frees up (Unix ms).
    done: Option<(RunReport, u64)>,
}

fn unavailable(what: &str, e: impl fmt::Display) -> StoreError {
    let text = orchestrix_worker::said_once(&format!("{what}: {e}"));
    // The server (or the client, before sending) refuses a value over its
    // size limit: no retry can change that.
    let lower = text.to_ascii_lowercase();
    if lower.contains("payload") && (lower.contains("exceed") || lower.contains("maximum")) {
        StoreError::Refused(text)
    } else {
        StoreError::Unavailable(text)
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, StoreError> {
    // A run's record is most of a kilobyte: grown from empty, its buffer
    // was reallocated and copied seven times a write.
    let mut buf = Vec::with_capacity(1024);
    rmp_serde::encode::write_named(&mut buf, v).map_err(|e| unavailable("cannot encode", e))?;
    Ok(Bytes::from(buf))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    orchestrix_proto::from_msgpack(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// What is known of a run whose stored record cannot be used.
fn quarantined_report(run_id: Uuid, flow: &str, reason: String) -> RunReport {
    RunReport {
        run_id: run_id.into(),
        flow: flow.to_owned(),
        version: None,
        status: orchestrix_proto::RunStatus::Quarantined,
        duration: Duration::ZERO,
        started_at: None,
        error: Some(reason),
        failed_step: None,
        steps: Vec::new(),
        late: Vec::new(),
        actions: Vec::new(),
        paused: None,
    }
}

/// KV keys allow few characters; idempotency keys are free text.
fn key_name(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

impl JetStreamStore {
    /// Opens (creating when missing) the store's buckets.
    pub async fn open(
        client: async_nats::Client,
        options: JetStreamStoreOptions,
    ) -> Result<Self, StoreError> {
        // Per-key TTL (idempotency keys, coordinator heartbeats) needs 2.11;
        // an older server fails later with an obscure decoding error.
        let version = client.server_info().version;
        if !orchestrix_worker::registry::server_supports_ttl(&version) {
            return Err(StoreError::Unsupported(format!(
                "nats-server {version} is too old for the JetStream store: it needs 2.11 or newer (KV per-key TTL); ./scripts/test.sh installs one"
            )));
        }
        // Bounded requests and acks: a bucket without a leader answers late or
        // never, and the caller decides what to do then.
        let js =
            jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client.clone());
        let p = &options.prefix;
        let bucket = |name: String, max_age: Duration, ttl: bool| kv::Config {
            bucket: name,
            history: 1,
            max_age,
            num_replicas: options.replicas,
            storage: jetstream::stream::StorageType::File,
            limit_markers: ttl.then_some(Duration::from_secs(1)),
            ..Default::default()
        };
        let open = |cfg: kv::Config| {
            let js = js.clone();
            async move {
                let name = cfg.bucket.clone();
                js.create_or_update_key_value(cfg)
                    .await
                    .map_err(|e| unavailable(&format!("cannot open bucket {name}"), e))
            }
        };
        let runs = open(bucket(format!("{p}_runs"), Duration::ZERO, false)).await?;
        let history = open(bucket(format!("{p}_history"), options.retention, false)).await?;
        let keys_bucket = format!("{p}_keys");
        let keys = open(bucket(keys_bucket.clone(), Duration::ZERO, true)).await?;
        let coordinators_bucket = format!("{p}_coordinators");
        let coordinators = open(bucket(coordinators_bucket.clone(), Duration::ZERO, true)).await?;
        let quarantine = open(bucket(format!("{p}_quarantine"), Duration::ZERO, false)).await?;
        let slots = open(bucket(format!("{p}_slots"), Duration::ZERO, false)).await?;
        let max_payload = client.server_info().max_payload;
        let id = Uuid::new_v4().simple().to_string();
        let journal_name = journal::stream_name(p);
        js.create_or_update_stream(jetstream::stream::Config {
            name: journal_name.clone(),
            subjects: vec![format!("{journal_name}.*")],
            num_replicas: options.replicas,
            storage: jetstream::stream::StorageType::File,
            allow_message_ttl: true,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&format!("cannot open stream {journal_name}"), e))?;
        let journal = js
            .get_stream(&journal_name)
            .await
            .map_err(|e| unavailable(&format!("cannot open stream {journal_name}"), e))?;
        let journal_subject = journal::subject(p, &id);
        let shared = Arc::new(journal::Shared::default());
        let (appender, appends) = tokio::sync::mpsc::unbounded_channel();
        let (ender, endings) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(journal::writer(
            js.clone(),
            journal.clone(),
            journal_subject.clone(),
            shared.clone(),
            max_payload,
            appends,
        ));
        no_older_coordinators(&coordinators).await?;
        // The first beat is written before the store is used, so no other
        // coordinator ever sees this one's runs as orphans.
        beat(&js, &coordinators_bucket, &id).await?;
        let heartbeat = tokio::spawn({
            let (js, bucket, id) = (js.clone(), coordinators_bucket, id.clone());
            let shared = shared.clone();
            async move {
                let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tick.tick().await;
                    match beat(&js, &bucket, &id).await {
                        Ok(()) => {
                            if renewed.elapsed() > HEARTBEAT_TTL {
                                tracing::warn!(
                                    gap = ?renewed.elapsed(),
                                    "the coordinator heartbeat lapsed: no run is taken over for a moment"
                                );
                                shared.was_cut_off();
                            }
                            renewed = tokio::time::Instant::now();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot renew the coordinator heartbeat")
                        }
                    }
                }
            }
        });
        let inner = Inner {
            js,
            runs,
            history,
            keys,
            keys_bucket,
            coordinators,
            quarantine,
            slots,
            max_payload,
            id,
            shared,
            appender,
            journal,
            journal_subject,
            purged: Default::default(),
            done_journals: Default::default(),
            ender,
            heartbeat,
            writer,
            options,
        };
        let inner = Arc::new(inner);
        tokio::spawn(end_runs(Arc::downgrade(&inner), endings));
        // Checkpoints until the store is dropped.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(journal::CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.checkpoint().await;
            }
        });
        Ok(JetStreamStore { inner })
    }

    /// This coordinator's id in the store.
    pub fn coordinator_id(&self) -> &str {
        &self.inner.id
    }
}

/// Most finished runs one history batch carries (the server takes 1,000).
const HISTORY_BATCH: usize = 256;

/// The ender task: writes the history entries of the runs that finished
/// meanwhile, all at once, then settles each run (key, slots, record). A run whose settling
/// fails is retried every second: its final record is in the journal, so
/// until then it is still this coordinator's to finish.
async fn end_runs(
    inner: std::sync::Weak<Inner>,
    mut endings: tokio::sync::mpsc::UnboundedReceiver<Ending>,
) {
    while let Some(first) = endings.recv().await {
        let mut batch = vec![first];
        while batch.len() < HISTORY_BATCH {
            match endings.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        // Each entry a put of its own, all in flight together. Atomic
        // batches (nats-server 2.12) were measured slower, with
        // `sync_interval: always` too: a header set per message, and the
        // server's filestore already syncs concurrent puts together.
        let done = futures::future::join_all(batch.into_iter().map(|e| {
            let inner = &inner;
            async move {
                let r = inner.settle(e.after.clone(), e.duration).await;
                (e, r)
            }
        }))
        .await;
        for (Ending { after, duration }, r) in done {
            match r {
                Ok(()) | Err(StoreError::Fenced(_)) => {}
                Err(e) if e.is_permanent() => inner.give_up(&after, &e).await,
                Err(e) => {
                    tracing::warn!(run_id = %after.run_id, error = %e, "cannot record a finished run yet: retrying");
                    let inner = Arc::downgrade(&inner);
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let Some(inner) = inner.upgrade() else { return };
                            match inner.settle(after.clone(), duration).await {
                                Ok(()) | Err(StoreError::Fenced(_)) => return,
                                Err(e) if e.is_permanent() => {
                                    inner.give_up(&after, &e).await;
                                    return;
                                }
                                Err(_) => {}
                            }
                        }
                    });
                }
            }
        }
    }
}

impl Inner {
    /// A finished run whose end the store refuses for good (a corrupt slot,
    /// an entry over the size limit): said loudly, and retired, so that its
    /// journal entry does not hold the journal's purge back for ever.
    async fn give_up(&self, after: &RunRecord, e: &StoreError) {
        tracing::error!(run_id = %after.run_id, error = %e, "a finished run cannot be recorded: its report was given to its caller, and is not kept");
        if let Err(e) = self.retire(after.run_id).await {
            tracing::warn!(run_id = %after.run_id, error = %e, "cannot retire a finished run's record");
        }
    }
}

/// Publishes a message with a per-message TTL to a KV key's subject.
async fn put_with_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    value: Bytes,
    ttl: Duration,
) -> Result<(), StoreError> {
    orchestrix_worker::registry::put_with_ttl(js, bucket, key, value, ttl)
        .await
        .map_err(|e| unavailable("KV write", e))
}

async fn beat(js: &jetstream::Context, bucket: &str, id: &str) -> Result<(), StoreError> {
    let now = format!("{HEARTBEAT_FORMAT}{}", time::unix_ms(SystemTime::now()));
    put_with_ttl(js, bucket, id, Bytes::from(now), HEARTBEAT_TTL).await
}

/// What a heartbeat value starts with: coordinators with the run journal.
/// Older ones wrote the bare time, and must not share a store with these
/// (they claim runs without fencing journals, and cannot see runs that only
/// a journal holds).
const HEARTBEAT_FORMAT: &str = "journal ";

/// Refuses to start beside a live coordinator that has no run journal
/// (its heartbeat is a bare number); one that just stopped is given its
/// heartbeat's lifetime to vanish.
async fn no_older_coordinators(coordinators: &kv::Store) -> Result<(), StoreError> {
    for round in 0..2 {
        let mut older = None;
        let mut keys =
            coordinators.keys().await.map_err(|e| unavailable("cannot list coordinators", e))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("cannot list coordinators", e))?;
            let value = coordinators
                .get(&key)
                .await
                .map_err(|e| unavailable("cannot read a heartbeat", e))?;
            if value
                .is_some_and(|v| std::str::from_utf8(&v).is_ok_and(|v| v.parse::<u64>().is_ok()))
            {
                older = Some(key);
            }
        }
        match older {
            None => return Ok(()),
            Some(_) if round == 0 => tokio::time::sleep(HEARTBEAT_TTL + HEARTBEAT_EVERY).await,
            Some(id) => {
                return Err(StoreError::Unsupported(format!(
                    "coordinator {id} on this NATS is an older version, without the run journal: stop every older coordinator before starting this one (docs/durability.md, \"Upgrading\")"
                )));
            }
        }
    }
    Ok(())
}

impl Inner {
    fn fits(&self, value: &Bytes) -> Result<(), StoreError> {
        // Headers and subject take a little room too.
        if value.len() + 512 > self.max_payload {
            return Err(StoreError::Refused(format!(
                "the run's record is {} bytes, over the {}-byte limit of the server",
                value.len(),
                self.max_payload
            )));
        }
        Ok(())
    }

    /// Writes a new run's first record, which must not exist yet (not even as
    /// a deleted one). False if it does: another start wrote it first.
    async fn create_new(&self, record: &RunRecord) -> Result<bool, StoreError> {
        let id = record.run_id;
        {
            // Two starts in this process never both take the same run id.
            let r = &mut self.shared.lock().revisions;
            if r.contains_key(&id) {
                // Another start here is writing it (a start sent again
                // whose key names it): whether that write lands is not
                // known yet, and answering "that run" would name a run
                // that may never exist. Asked again, the key decides.
                return Err(StoreError::Unavailable(format!(
                    "run {id} is being written by another start; start again with the same key"
                )));
            }
            r.insert(id, 0);
        }
        let value = self.stored(record)?;
        let written = self.fits(&value);
        let written = match written {
            Ok(()) => self.runs.update(id.to_string(), value.clone(), 0).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    unavailable("cannot write the run", e),
                )
            }),
            Err(e) => Err((false, e)),
        };
        match written {
            Ok(rev) => {
                self.set_revision(id, Some(rev));
                Ok(true)
            }
            Err((exists, e)) => {
                // Whether or not the write landed, this process does not run
                // it now: if it did land, the takeover scan finds a record of
                // ours that nothing drives and resumes it.
                self.set_revision(id, None);
                if exists {
                    match self.runs.entry(id.to_string()).await {
                        Ok(Some(entry)) if entry.value == value => {
                            // Our own write, whose acknowledgement was lost.
                            self.set_revision(id, Some(entry.revision));
                            return Ok(true);
                        }
                        // Another start's record: that run it is.
                        Ok(Some(_)) => return Ok(false),
                        // Refused as existing, yet nothing there to read (a
                        // store failing over): not "another start got there
                        // first", or the start would be answered with a run
                        // that does not exist. An error the caller retries:
                        // with the key, the next start writes this very run.
                        Ok(None) | Err(_) => {
                            tracing::warn!(run_id = %id, error = %e, "a new run's record was refused as existing, and cannot be read back");
                        }
                    }
                }
                Err(e)
            }
        }
    }

    fn stored(&self, record: &RunRecord) -> Result<Bytes, StoreError> {
        encode(&StoredRef { owner: &self.id, record })
    }

    fn revision(&self, run_id: Uuid) -> Option<u64> {
        self.shared.lock().revisions.get(&run_id).copied()
    }

    fn set_revision(&self, run_id: Uuid, revision: Option<u64>) {
        let mut s = self.shared.lock();
        match revision {
            Some(rev) => {
                s.revisions.insert(run_id, rev);
            }
            None => {
                s.revisions.remove(&run_id);
                s.forget(run_id);
            }
        };
    }

    /// Starts a run with no idempotency key: its first record goes to the
    /// journal (run ids are fresh, so no other start can hold this one).
    async fn create_journaled(&self, record: &Arc<RunRecord>) -> Result<Created, StoreError> {
        let id = record.run_id;
        let mut fenced = false;
        loop {
            self.shared.lock().revisions.insert(id, 0);
            match self.append(record).await {
                Ok(()) => return Ok(Created::New),
                // Its append met a fence (this coordinator was presumed dead
                // while cut off): the runs it had are lost, but a new one is
                // nobody else's. Once the fence is obeyed, appends go after
                // it: write it again, once.
                Err(StoreError::Fenced(_)) if !fenced => fenced = true,
                Err(e) => {
                    self.set_revision(id, None);
                    return Err(e);
                }
            }
        }
    }

    /// Writes a record this coordinator owns: compare-and-set on the revision
    /// it last wrote, so a coordinator that lost the run cannot overwrite it.
    /// With `claim`, a run this coordinator does not hold is created (a
    /// reopened run); without, such a write is refused as fenced (a
    /// checkpoint of a run lost meanwhile must not win it back).
    async fn write(&self, record: &RunRecord, claim: bool) -> Result<(), StoreError> {
        let id = record.run_id;
        let value = self.stored(record)?;
        self.fits(&value)?;
        let mut expected = self.revision(id);
        if expected.is_none() && !claim {
            return Err(StoreError::Fenced(id));
        }
        // Two tries: a write whose acknowledgement was lost (a timeout under
        // load) leaves a newer revision holding these very bytes; adopt it
        // once. Bytes, not the owner's name: a taker restoring this
        // coordinator's journal writes records in its name too.
        for _ in 0..2 {
            let attempt = match expected {
                Some(rev) => {
                    self.runs.update(id.to_string(), value.clone(), rev).await.map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            unavailable("cannot write the run", e),
                        )
                    })
                }
                None => self.runs.create(id.to_string(), value.clone()).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        unavailable("cannot write the run", e),
                    )
                }),
            };
            match attempt {
                Ok(written) => {
                    let mut s = self.shared.lock();
                    if !claim && !s.revisions.contains_key(&id) {
                        // Lost while this write was on its way.
                        return Err(StoreError::Fenced(id));
                    }
                    s.revisions.insert(id, written);
                    return Ok(());
                }
                Err((false, e)) => return Err(e),
                Err((true, _)) => match self.runs.entry(id.to_string()).await {
                    Ok(Some(entry)) if entry.value == value => {
                        expected = Some(entry.revision);
                    }
                    // Cannot tell now (no leader, say): write again later.
                    Err(e) => return Err(unavailable("cannot read the run back", e)),
                    // Still in this coordinator's name, with other bytes: an
                    // older write of its own whose answer was lost (or that
                    // reached the server late, from a connection that was
                    // frozen), or a taker's restore of its journal (a fence
                    // this coordinator has not met yet; its next append meets
                    // it). Not a takeover: dropping the run as lost would
                    // leave its newer record in the journal only, and the run
                    // would be resumed from the older one, deciding its last
                    // steps again (found by the `freeze` harness). The older
                    // of the two gives way.
                    Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                        match decode::<Stored>(&entry.value) {
                            Ok(s) if s.owner == self.id => {
                                if !journal::newer_than(&s.record, record) {
                                    expected = Some(entry.revision);
                                    continue;
                                }
                                // The bucket is ahead of this copy already.
                                let mut s = self.shared.lock();
                                if !claim && !s.revisions.contains_key(&id) {
                                    return Err(StoreError::Fenced(id));
                                }
                                s.revisions.insert(id, entry.revision);
                                return Ok(());
                            }
                            // Someone else owns it now: this coordinator was presumed dead.
                            _ => return Err(self.fenced(id)),
                        }
                    }
                    _ => return Err(self.fenced(id)),
                },
            }
        }
        // Other writes in this coordinator's name kept landing in between:
        // written again later, still this coordinator's.
        Err(StoreError::Unavailable(format!("run {id}: its record kept changing under a write")))
    }

    /// The run is not this coordinator's any more: forget it, so that if it
    /// ever comes back to this coordinator it is resumed, not skipped.
    fn fenced(&self, id: Uuid) -> StoreError {
        // Said, with the run's id: a run let go here that nobody took is
        // resumed from the bucket's record, and the soak harness's stories
        // need to show where that began.
        tracing::info!(run_id = %id, "the run's record is no longer this coordinator's: letting it go");
        self.set_revision(id, None);
        StoreError::Fenced(id)
    }

    /// Claims the idempotency key for `record`, then writes the record. The
    /// key is claimed first, so a concurrent start finds it; a start that
    /// claimed the key but failed to write its run leaves a key that names a
    /// run that does not exist, and the next start with the key writes that
    /// very run (same id): the key never leads to a run that never existed.
    async fn start_keyed(&self, record: &Arc<RunRecord>, key: &str) -> Result<Created, StoreError> {
        let name = key_name(key);
        let value = encode(&KeyValue { run_id: record.run_id, done: None })?;
        loop {
            match self.keys.create(&name, value.clone()).await {
                Ok(_) => {
                    return self.write_claimed(record).await;
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(unavailable("cannot claim the idempotency key", e)),
            }
            let Some(entry) =
                self.keys.entry(&name).await.map_err(|e| unavailable("cannot read a key", e))?
            else {
                continue; // expired between the two calls: claim again
            };
            if entry.operation != kv::Operation::Put {
                // Deleted or expired: claim it over the marker, atomically.
                match self.keys.update(&name, value.clone(), entry.revision).await {
                    Ok(_) => {
                        return self.write_claimed(record).await;
                    }
                    Err(_) => continue,
                }
            }
            let held: KeyValue = decode(&entry.value)?;
            match held.done {
                None if self.report(held.run_id).await?.is_none() => {
                    // The key names a run that was never written: write it now,
                    // under its id. Only if no record of it ever existed, so a
                    // late write of the first start makes this one give way.
                    let mut adopted = (**record).clone();
                    adopted.run_id = held.run_id;
                    let adopted = Arc::new(adopted);
                    return if self.create_new(&adopted).await? {
                        Ok(Created::Adopted(adopted))
                    } else {
                        Ok(Created::Existing { run_id: held.run_id, report: None })
                    };
                }
                None => return Ok(Created::Existing { run_id: held.run_id, report: None }),
                Some((report, expires)) if expires > time::unix_ms(SystemTime::now()) => {
                    return Ok(Created::Existing {
                        run_id: held.run_id,
                        report: Some(Box::new(report)),
                    });
                }
                Some(_) => match self.keys.update(&name, value.clone(), entry.revision).await {
                    Ok(_) => {
                        return self.write_claimed(record).await;
                    }
                    Err(_) => continue,
                },
            }
        }
    }

    /// Writes the run whose key this start just claimed; should the run
    /// exist already (another start got there first), it is that one.
    async fn write_claimed(&self, record: &RunRecord) -> Result<Created, StoreError> {
        if self.create_new(record).await? {
            Ok(Created::New)
        } else {
            Ok(Created::Existing { run_id: record.run_id, report: None })
        }
    }

    /// Moves a run aside: its report (status `quarantined`) goes to the
    /// history, the raw record to the quarantine bucket, its key (if known)
    /// is answered with the report, and the live record is deleted.
    async fn quarantine(
        &self,
        run_id: Uuid,
        raw: Option<Bytes>,
        report: RunReport,
        key: Option<&str>,
    ) -> Result<(), StoreError> {
        let id = run_id.to_string();
        #[derive(Serialize)]
        struct Aside<'a> {
            reason: &'a str,
            record: Option<Bytes>,
        }
        let reason = report.error.as_deref().unwrap_or_default();
        let raw = raw.filter(|r| r.len() + 4096 < self.max_payload);
        let aside = encode(&Aside { reason, record: raw })?;
        self.quarantine
            .put(&id, aside)
            .await
            .map_err(|e| unavailable("cannot write to the quarantine", e))?;
        self.history
            .put(&id, encode(&report)?)
            .await
            .map_err(|e| unavailable("cannot write the history", e))?;
        if let Some(key) = key {
            let ttl = self.options.default_ttl;
            let expires = time::unix_ms(SystemTime::now() + ttl);
            let value = encode(&KeyValue { run_id, done: Some((report, expires)) })?;
            put_with_ttl(&self.js, &self.keys_bucket, &key_name(key), value, ttl).await?;
        }
        self.runs.delete(&id).await.map_err(|e| unavailable("cannot retire the run", e))?;
        self.set_revision(run_id, None);
        Ok(())
    }

    /// A run's end: its final record goes to the journal, and the run has
    /// ended once that is durable (a coordinator recovering now sees a
    /// finished run, and finishes the job). The history entry, the key and
    /// the slots follow, written by the ender task in batches.
    async fn finish(&self, after: Arc<RunRecord>, duration: Duration) -> Result<(), StoreError> {
        // Written to the journal, it is also the check that the run is still
        // this coordinator's.
        self.append(&after).await?;
        if let Err(e) = self.ender.send(Ending { after, duration }) {
            let Ending { after, duration } = e.0;
            return self.settle(after, duration).await;
        }
        Ok(())
    }

    /// A finished run's history entry (with its record, for a failed
    /// rollback that can be resumed later).
    fn history_entry(after: &RunRecord, duration: Duration) -> Result<Bytes, StoreError> {
        let report = after.to_report(duration);
        let reopen =
            (after.status == orchestrix_proto::RunStatus::CompensationFailed).then_some(after);
        encode(&HistoryEntry { report: &report, reopen })
    }

    /// Writes a finished run's history entry, then [`Inner::settled`].
    async fn settle(&self, after: Arc<RunRecord>, duration: Duration) -> Result<(), StoreError> {
        let id = after.run_id.to_string();
        self.history
            .put(&id, Self::history_entry(&after, duration)?)
            .await
            .map_err(|e| unavailable("cannot write the history", e))?;
        self.settled(after, duration).await
    }

    /// What follows a finished run's history entry: its key answers with
    /// the report, its slots are released, its record retired.
    async fn settled(&self, after: Arc<RunRecord>, duration: Duration) -> Result<(), StoreError> {
        let report = after.to_report(duration);
        if let Some(key) = &after.extras().key {
            let ttl = after.extras().ttl.unwrap_or(self.options.default_ttl);
            let expires = time::unix_ms(SystemTime::now() + ttl);
            let value = encode(&KeyValue { run_id: after.run_id, done: Some((report, expires)) })?;
            put_with_ttl(&self.js, &self.keys_bucket, &key_name(key), value, ttl).await?;
        }
        // Its slots go before its record: a coordinator that dies in between
        // leaves a finished record, whose retirement (this, again) lets go.
        for slot in &after.extras().slots {
            self.release_slot(slot, after.run_id).await?;
        }
        self.retire(after.run_id).await
    }

    /// Changes one slot's state with a compare-and-set, as often as others
    /// change it in between. `change` returns false to write nothing.
    async fn change_slot<T>(
        &self,
        slot: &str,
        mut change: impl FnMut(&mut SlotState) -> (bool, T),
    ) -> Result<T, StoreError> {
        loop {
            let entry =
                self.slots.entry(slot).await.map_err(|e| unavailable("cannot read a slot", e))?;
            let (mut state, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (decode(&e.value)?, e.revision),
                Some(e) => (SlotState::default(), e.revision),
                None => (SlotState::default(), 0),
            };
            let (write, out) = change(&mut state);
            if !write {
                return Ok(out);
            }
            match self.slots.update(slot, encode(&state)?, revision).await {
                Ok(_) => return Ok(out),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable("cannot write a slot", e)),
            }
        }
    }

    async fn release_slot(&self, slot: &str, holder: Uuid) -> Result<(), StoreError> {
        self.change_slot(slot, |s| (s.release(holder), ())).await
    }

    async fn report(&self, run_id: Uuid) -> Result<Option<RunReport>, StoreError> {
        if let Some(record) = self.shared.pending(run_id) {
            return Ok(Some(local_report(&record)));
        }
        let id = run_id.to_string();
        // Read in the order the runs are written the other way round: a
        // run's history entry is written before its live record is deleted,
        // so a history entry found after a live record is the newer of them,
        // unless the run was reopened since (see `newer`).
        let live = self.runs.get(&id).await.map_err(|e| unavailable("cannot read the run", e))?;
        let live = live.map(|b| live_report(run_id, &b));
        match self.history.get(&id).await.map_err(|e| unavailable("cannot read the history", e))? {
            Some(b) => Ok(Some(newer(live, decode(&b)?))),
            None => Ok(live),
        }
    }
}

/// Of a run found both live and in the history, the newer. A run that
/// just ended has an older live copy until it is deleted: the history
/// entry. A run an operator reopened has its old history entry until it
/// ends again, and its live record carries the operator's action beside
/// those of the entry: the live one.
fn newer(live: Option<RunReport>, history: RunReport) -> RunReport {
    match live {
        Some(live) if live.actions.len() > history.actions.len() => live,
        _ => history,
    }
}

/// The report of a record this coordinator holds: a finished run's
/// duration is its own, a live one's the time since it started.
fn local_report(record: &RunRecord) -> RunReport {
    let elapsed = record
        .duration
        .unwrap_or_else(|| SystemTime::now().duration_since(record.started_at).unwrap_or_default());
    record.to_report(elapsed)
}

/// The report of a live record; one that does not decode is reported as
/// such (the takeover scan moves it aside), never as an error that hides
/// every other run.
fn live_report(run_id: Uuid, bytes: &[u8]) -> RunReport {
    match decode::<Stored>(bytes) {
        Ok(s) => {
            let elapsed = SystemTime::now().duration_since(s.record.started_at).unwrap_or_default();
            s.record.to_report(elapsed)
        }
        Err(e) => {
            quarantined_report(run_id, "", format!("the run's stored record does not decode: {e}"))
        }
    }
}

/// How often a wait for a slot looks again, besides watching it: a watch
/// can go quiet while the bucket changes leader.
const SLOT_POLL: Duration = Duration::from_secs(2);

impl Store for JetStreamStore {
    fn acquire(
        &self,
        slot: &str,
        limit: u32,
        holder: Uuid,
    ) -> BoxFuture<'static, Result<Grant, StoreError>> {
        let (inner, slot) = (self.inner.clone(), slot.to_owned());
        Box::pin(async move {
            inner
                .change_slot(&slot, |s| {
                    let before = s.clone();
                    let grant = s.acquire(holder, limit);
                    (*s != before, grant)
                })
                .await
        })
    }

    fn release(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        let (inner, slot) = (self.inner.clone(), slot.to_owned());
        Box::pin(async move { inner.release_slot(&slot, holder).await })
    }

    fn granted(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        let (inner, slot) = (self.inner.clone(), slot.to_owned());
        Box::pin(async move {
            // Watch first, then look: a hand-over in between is not missed.
            let mut watch = inner.slots.watch(&slot).await.ok();
            loop {
                let state = match inner.slots.get(&slot).await {
                    Ok(Some(b)) => Some(decode::<SlotState>(&b)?),
                    Ok(None) => None,
                    Err(e) => {
                        tracing::debug!(%slot, error = %e, "cannot read a slot; looking again");
                        Some(SlotState { waiting: vec![holder], ..Default::default() })
                    }
                };
                match state {
                    Some(s) if s.holds(holder) => return Ok(()),
                    Some(s) if s.knows(holder) => {}
                    _ => return Err(StoreError::NotFound(holder)),
                }
                let change = async {
                    match watch.as_mut() {
                        Some(w) => {
                            w.next().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let _ = tokio::time::timeout(SLOT_POLL, change).await;
            }
        })
    }

    fn placed(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (inner, slot) = (self.inner.clone(), slot.to_owned());
        Box::pin(async move {
            match inner.slots.get(&slot).await {
                Ok(Some(b)) => Ok(decode::<SlotState>(&b)?.knows(holder)),
                Ok(None) => Ok(false),
                Err(e) => Err(unavailable("cannot read a slot", e)),
            }
        })
    }

    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>> {
        let (inner, record) = (self.inner.clone(), record.clone());
        Pending::later(async move {
            match &record.extras().key {
                Some(key) => inner.start_keyed(&record, key).await,
                None => inner.create_journaled(&record).await,
            }
        })
    }

    fn apply(
        &self,
        run_id: Uuid,
        batch: &[Transition],
        after: &Arc<RunRecord>,
    ) -> Pending<Result<(), StoreError>> {
        let (inner, after) = (self.inner.clone(), after.clone());
        let finished = match batch.last() {
            Some(Transition::Finished { duration, .. }) => Some(*duration),
            _ => None,
        };
        Pending::later(async move {
            match finished {
                Some(duration) => inner.finish(after, duration).await,
                None => {
                    debug_assert_eq!(after.run_id, run_id);
                    inner.append(&after).await
                }
            }
        })
    }

    fn reopen(
        &self,
        run_id: Uuid,
    ) -> BoxFuture<'static, Result<Option<Arc<RunRecord>>, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let id = run_id.to_string();
            let Some(bytes) = inner
                .history
                .get(&id)
                .await
                .map_err(|e| unavailable("cannot read the history", e))?
            else {
                return Ok(None);
            };
            let Some(record) = decode::<Reopenable>(&bytes)?.reopen else { return Ok(None) };
            // Created anew under this coordinator: of two asking, one wins.
            inner.set_revision(run_id, None);
            inner.write(&record, true).await?;
            Ok(Some(Arc::new(record)))
        })
    }

    fn report(&self, run_id: Uuid) -> Pending<Result<Option<RunReport>, StoreError>> {
        let inner = self.inner.clone();
        Pending::later(async move { inner.report(run_id).await })
    }

    fn wait(&self, run_id: Uuid) -> BoxFuture<'static, Result<RunReport, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let id = run_id.to_string();
            // Watch first, then look: a report written in between is not missed.
            let mut watch = inner
                .history
                .watch(&id)
                .await
                .map_err(|e| unavailable("cannot watch the history", e))?;
            if let Some(b) = inner
                .history
                .get(&id)
                .await
                .map_err(|e| unavailable("cannot read the history", e))?
            {
                return decode(&b);
            }
            // A run found by its idempotency key may not be written yet: its
            // coordinator claims the key first. Give it a moment to appear.
            let mut tries = 0;
            while inner.report(run_id).await?.is_none() {
                tries += 1;
                if tries > 50 {
                    return Err(StoreError::NotFound(run_id));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| unavailable("history watch failed", e))?;
                if entry.operation == kv::Operation::Put {
                    return decode(&entry.value);
                }
            }
            Err(unavailable("history watch ended", run_id))
        })
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'static, Result<Vec<RunReport>, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            // A run may be in both buckets (just ended: its history entry
            // is written before its live record goes; or reopened): it is
            // listed once, as the newer of the two says.
            let mut live_runs: std::collections::HashMap<Uuid, RunReport> =
                std::collections::HashMap::new();
            for (bucket, live) in [(&inner.runs, true), (&inner.history, false)] {
                let mut keys =
                    bucket.keys().await.map_err(|e| unavailable("cannot list runs", e))?;
                while let Some(key) = keys.next().await {
                    let key = key.map_err(|e| unavailable("cannot list runs", e))?;
                    let Some(b) =
                        bucket.get(&key).await.map_err(|e| unavailable("cannot read a run", e))?
                    else {
                        continue;
                    };
                    let report = if live {
                        let id = key.parse().unwrap_or_default();
                        live_report(id, &b)
                    } else {
                        match decode::<RunReport>(&b) {
                            Ok(r) => r,
                            Err(e) => {
                                let id = key.parse().unwrap_or_default();
                                let why = format!("the run's stored report does not decode: {e}");
                                quarantined_report(id, "", why)
                            }
                        }
                    };
                    if live {
                        live_runs.insert(report.run_id.into(), report);
                        continue;
                    }
                    let report = newer(live_runs.remove(&report.run_id.into()), report);
                    if filter.keeps(&report) {
                        out.push(report);
                    }
                }
            }
            out.extend(live_runs.into_values().filter(|r| filter.keeps(r)));
            // Runs of this coordinator that only the journal has yet; for
            // the others, their journal record is newer than their KV one.
            let local = inner.shared.all_pending();
            if !local.is_empty() {
                let local: std::collections::HashMap<Uuid, RunReport> =
                    local.iter().map(|r| (r.run_id, local_report(r))).collect();
                let mut seen = std::collections::HashSet::new();
                for r in &mut out {
                    let id: Uuid = r.run_id.into();
                    if let Some(newer) = local.get(&id) {
                        let live = matches!(
                            r.status,
                            orchestrix_proto::RunStatus::Queued
                                | orchestrix_proto::RunStatus::Running
                                | orchestrix_proto::RunStatus::Paused
                        );
                        if live {
                            *r = newer.clone();
                        }
                        seen.insert(id);
                    }
                }
                out.extend(
                    local
                        .into_iter()
                        .filter(|(id, r)| !seen.contains(id) && filter.keeps(r))
                        .map(|(_, r)| r),
                );
            }
            Ok(filter.finish(out))
        })
    }

    fn quarantine(
        &self,
        record: &Arc<RunRecord>,
        reason: String,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (inner, record) = (self.inner.clone(), record.clone());
        Box::pin(async move {
            let report = record.quarantined_report(reason);
            // Set aside, it holds nothing: the runs behind it go on.
            for slot in &record.extras().slots {
                inner.release_slot(slot, record.run_id).await?;
            }
            inner.quarantine(record.run_id, None, report, record.extras().key.as_deref()).await
        })
    }

    fn note_late(
        &self,
        run_id: Uuid,
        line: String,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let id = run_id.to_string();
            for _ in 0..3 {
                let entry = inner
                    .history
                    .entry(&id)
                    .await
                    .map_err(|e| unavailable("cannot read the history", e))?;
                let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                    return Ok(false);
                };
                let mut report: RunReport = decode(&entry.value)?;
                if report.late.len() >= crate::record::MAX_LATE_NOTES || report.late.contains(&line)
                {
                    return Ok(false);
                }
                report.late.push(line.clone());
                if inner.history.update(&id, encode(&report)?, entry.revision).await.is_ok() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    fn claim_orphans(
        &self,
        flows: Arc<[Arc<str>]>,
        here: Arc<dyn ActorsHere>,
    ) -> BoxFuture<'static, Result<Vec<Arc<RunRecord>>, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // A run claimed is this coordinator's to drive: whatever fails
            // later in the scan, it is handed back, never dropped (a claimed
            // run left behind would be skipped by every later scan as "ours").
            let mut out = Vec::new();
            match inner.scan_orphans(&flows, &*here, &mut out).await {
                Ok(()) => Ok(out),
                Err(e) if out.is_empty() => Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, claimed = out.len(), "the scan for orphaned runs stopped early");
                    Ok(out)
                }
            }
        })
    }
}

/// Longest wait for the next key of the runs bucket while scanning: the
/// listing is a consumer, which a leaderless stream can leave silent.
const SCAN_STEP_TIMEOUT: Duration = Duration::from_secs(10);

impl Inner {
    /// A live record of a run the history says ended (its owner's delete
    /// failed): deleted, and true, so that it is never run again.
    async fn retired_if_ended(&self, key: &str, revision: u64) -> Result<bool, StoreError> {
        let ended = self
            .history
            .get(key)
            .await
            .map_err(|e| unavailable("cannot read the history", e))?
            .is_some();
        if ended {
            self.runs
                .delete_expect_revision(key, Some(revision))
                .await
                .map_err(|e| unavailable("cannot retire the run", e))?;
        }
        Ok(ended)
    }

    /// Claims the live runs no live coordinator drives, into `out`.
    async fn scan_orphans(
        &self,
        flows: &[Arc<str>],
        here: &dyn ActorsHere,
        out: &mut Vec<Arc<RunRecord>>,
    ) -> Result<(), StoreError> {
        let mut alive: std::collections::HashMap<String, bool> = Default::default();
        // Cut off a moment ago: only this coordinator's own runs.
        let taking_over = self.shared.may_take_over();
        // Dead coordinators' journals first: their newest records go to the
        // runs bucket, and the fence keeps them from writing again.
        let mut taken = if taking_over {
            self.take_dead_journals(&mut alive).await?
        } else {
            Default::default()
        };
        let mut keys = self.runs.keys().await.map_err(|e| unavailable("cannot list runs", e))?;
        // The listing may name a key again once it changed (this scan's own
        // claim changes it): a run is looked at once per scan, or a fence
        // obeyed meanwhile could get it claimed, and resumed, twice.
        let mut seen = std::collections::HashSet::new();
        loop {
            let next =
                tokio::time::timeout(SCAN_STEP_TIMEOUT, keys.next()).await.map_err(|_| {
                    StoreError::Unavailable(format!(
                        "cannot list runs: no answer in {SCAN_STEP_TIMEOUT:?}"
                    ))
                })?;
            let Some(key) = next else { return Ok(()) };
            let key = key.map_err(|e| unavailable("cannot list runs", e))?;
            if !seen.insert(key.clone()) {
                continue;
            }
            let Some(entry) =
                self.runs.entry(&key).await.map_err(|e| unavailable("cannot read a run", e))?
            else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let mut stored: Stored = match decode(&entry.value) {
                Ok(s) => s,
                Err(e) => {
                    // Poison: move it aside (once: the delete is the claim).
                    let run_id = key.parse().unwrap_or_default();
                    let why = format!("the run's stored record does not decode: {e}");
                    tracing::error!(%run_id, reason = %why, "quarantining a run");
                    let report = quarantined_report(run_id, "", why);
                    self.quarantine(run_id, Some(entry.value.clone()), report, None).await?;
                    continue;
                }
            };
            if !flows.iter().any(|f| **f == *stored.record.flow) {
                continue; // a coordinator that serves this flow takes it
            }
            let run_id = stored.record.run_id;
            if here.is_live(run_id) {
                // Its actor still lives here. If the run is no longer held
                // for it, this coordinator was fenced while that actor waited
                // (on a long step, say), and a second actor would drive the
                // run beside it, both acting on the same answers. Until it
                // has stopped, the run stays unheld (nothing it writes is
                // taken); a later scan resumes the run, once.
                if self.revision(run_id).is_none() {
                    // Said once by the actor when it lets go; a busy actor
                    // may take a few scans to get to it.
                    tracing::debug!(%run_id, "a run lost to a fence still has its actor here: letting go first");
                    here.let_go(run_id);
                }
                continue;
            }
            let revision = if stored.owner == self.id {
                // Ours, but nothing here drives it: a start whose write
                // landed although it reported an error, a run let go after
                // a write that could not be told apart from a takeover, or
                // one lost to a fence while this coordinator was cut off.
                // Resume it.
                if self.revision(run_id).is_some() {
                    continue;
                }
                // Lost to a fence with a newer record than this one, not yet
                // put back in the bucket: resumed once it is.
                if self.shared.orphaned(run_id) {
                    continue;
                }
                // Ended, but its record was not retired (the delete failed):
                // retire it, never run it again.
                if self.retired_if_ended(&key, entry.revision).await? {
                    continue;
                }
                tracing::warn!(%run_id, "resuming a run of this coordinator that nothing drives");
                // A compare-and-set, so a taker's claim and this resume
                // have one winner.
                match self.runs.update(&key, entry.value.clone(), entry.revision).await {
                    Ok(revision) => revision,
                    Err(_) => continue,
                }
            } else {
                if !taking_over || self.alive(&stored.owner, &mut alive).await? {
                    continue;
                }
                // Ended, its record not retired (its owner's delete failed, a
                // store failing over): retired here, never run again, as the
                // owner's own scan does.
                if self.retired_if_ended(&key, entry.revision).await? {
                    continue;
                }
                // Never claimed before its owner's journal is fenced: a
                // coordinator presumed dead must not write the run again.
                if !taken.contains(&stored.owner) {
                    match self.take_journal(&stored.owner, usize::MAX, &mut alive).await {
                        Ok(Some(_)) => {}
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(owner = %stored.owner, error = %e, "cannot take a dead coordinator's journal yet");
                            continue;
                        }
                    }
                    taken.insert(stored.owner.clone());
                }
                // Fence the owner again if it appended since its last fence:
                // it may have resumed this run meanwhile (its heartbeat lost,
                // not its journal), and then its progress, commands sent
                // included, is in its journal only. Claiming the record read
                // above would go back on steps it started: what it appended
                // is restored first, and the record read again.
                // What the owner appended up to `since` is in the bucket.
                let since = match self.fence_again(&stored.owner, &mut alive).await {
                    Ok(Some(since)) => since,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(owner = %stored.owner, error = %e, "cannot take a dead coordinator's journal yet");
                        continue;
                    }
                };
                let subject = journal::subject(&self.options.prefix, &stored.owner);
                let Some(entry) =
                    self.runs.entry(&key).await.map_err(|e| unavailable("cannot read a run", e))?
                else {
                    continue;
                };
                // Gone, or claimed meanwhile; poison waits for the next scan.
                let newest = match decode::<Stored>(&entry.value) {
                    Ok(n) if entry.operation == kv::Operation::Put && n.owner == stored.owner => n,
                    _ => continue,
                };
                // Claim it: one compare-and-set, one winner. A claim whose
                // answer is lost but that landed makes the run ours: the
                // next scan finds it in the branch above.
                let claimed =
                    self.runs.update(&key, self.stored(&newest.record)?, entry.revision).await;
                let Ok(mut revision) = claimed else { continue };
                tracing::info!(%run_id, owner = %stored.owner, "claimed a run of a coordinator presumed dead");
                // The owner, cut off but alive, may have won this run back
                // by a claim of its own after obeying an earlier fence, and
                // may append (and send what follows) until it meets a new
                // one: fence it now that the claim is made, and take what
                // it appended for this run since the record was read.
                match self.progress_since(&subject, since, run_id).await {
                    // The bucket's is as new (the owner's appends were of a
                    // copy from before a later claim).
                    Ok(Some(record)) if journal::at_least_as_new(&newest.record, &record) => {
                        stored = newest
                    }
                    Ok(None) => stored = newest,
                    Ok(Some(record)) => {
                        tracing::warn!(%run_id, owner = %stored.owner, "the presumed-dead owner moved the run on meanwhile: resumed from there");
                        // In the bucket before anything is decided from it:
                        // the owner's journal is fenced now, so this copy is
                        // the only one, and a fence of this coordinator
                        // before its next append would lose it (its next
                        // owner would resume the older one and send its
                        // steps again).
                        let value = self.stored(&record)?;
                        match self.runs.update(&key, value, revision).await {
                            Ok(moved) => revision = moved,
                            Err(e) => {
                                tracing::warn!(%run_id, error = %e, "cannot put the run's newest record in the bucket yet");
                                // Put there by the next checkpoint round; the
                                // run is resumed once it is.
                                self.shared.keep_to_put_back(record);
                                continue;
                            }
                        }
                        stored = Stored { owner: self.id.clone(), record };
                    }
                    Err(e) => {
                        // Not resumed from a record that may be behind: the
                        // next scan finds it ours and undriven.
                        tracing::warn!(%run_id, error = %e, "cannot fence the run's previous owner yet");
                        continue;
                    }
                }
                revision
            };
            self.set_revision(run_id, Some(revision));
            let rec = Arc::new(stored.record);
            if rec.phase == Phase::Finished {
                // Died between its final record and its retirement: finish
                // the job (found again by a later scan if this fails).
                let duration = rec.duration.unwrap_or_default();
                if let Err(e) = self.settle(rec, duration).await {
                    self.set_revision(run_id, None);
                    return Err(e);
                }
                continue;
            }
            out.push(rec);
        }
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn a_failed_rollback_keeps_its_record_in_the_history() {
        let def = {
            let mut d = crate::FlowDef::new("f");
            d.steps.push(crate::StepDef::new("s"));
            d
        };
        let rec = RunRecord::new(
            Uuid::now_v7(),
            &def,
            orchestrix_proto::Payload::nil(),
            SystemTime::now(),
        );
        let report = rec.to_report(Duration::ZERO);
        let bytes = encode(&HistoryEntry { report: &report, reopen: Some(&rec) }).unwrap();
        let back: Reopenable = decode(&bytes).unwrap();
        assert_eq!(back.reopen.unwrap().run_id, rec.run_id);
        let plain: RunReport = decode(&bytes).unwrap();
        assert_eq!(plain.run_id, report.run_id);
    }
}
