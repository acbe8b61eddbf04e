//! The durable store: runs, their history and idempotency keys in NATS
//! JetStream KV, so a coordinator that dies loses nothing.
//!
//! Three buckets, named after the subject prefix:
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `{prefix}_runs` | run id | the live run's record (MessagePack), rewritten per batch of transitions |
//! | `{prefix}_history` | run id | the final report; entries expire after the retention (bucket `max_age`) |
//! | `{prefix}_keys` | hex of the idempotency key | the run id, then its report; expires `ttl` after the run ended (per-key TTL, nats-server ≥ 2.11) |
//!
//! What a transition costs: one KV put of the run's record per batch (a step
//! completing and the next one starting are one batch), so a 3-step run
//! writes 4 records, then its end costs 3 writes (final record, history, key
//! or delete). Writes are JetStream publishes acknowledged by the server
//! (and, with replicas, by a quorum) before the run moves on.

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

use crate::record::{Phase, RunRecord, Transition};
use crate::store::{Created, Pending, Store, StoreError};

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
    options: JetStreamStoreOptions,
}

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
    StoreError::Unavailable(format!("{what}: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, StoreError> {
    rmp_serde::to_vec_named(v).map(Bytes::from).map_err(|e| unavailable("cannot encode", e))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(b).map_err(|e| unavailable("corrupt store entry", e))
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
        let js = jetstream::new(client);
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
        Ok(JetStreamStore {
            inner: Arc::new(Inner { js, runs, history, keys, keys_bucket, options }),
        })
    }
}

impl Inner {
    async fn claim(&self, record: &RunRecord, key: &str) -> Result<Created, StoreError> {
        let name = key_name(key);
        let value = encode(&KeyValue { run_id: record.run_id, done: None })?;
        loop {
            match self.keys.create(&name, value.clone()).await {
                Ok(_) => return Ok(Created::New),
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
                    Ok(_) => return Ok(Created::New),
                    Err(_) => continue,
                }
            }
            let held: KeyValue = decode(&entry.value)?;
            match held.done {
                None => return Ok(Created::Existing { run_id: held.run_id, report: None }),
                Some((report, expires)) if expires > time::unix_ms(SystemTime::now()) => {
                    return Ok(Created::Existing { run_id: held.run_id, report: Some(report) });
                }
                Some(_) => match self.keys.update(&name, value.clone(), entry.revision).await {
                    Ok(_) => return Ok(Created::New),
                    Err(_) => continue,
                },
            }
        }
    }

    async fn finish(&self, after: Arc<RunRecord>, duration: Duration) -> Result<(), StoreError> {
        let id = after.run_id.to_string();
        // Final record first: a coordinator recovering now sees a finished run, not a live one.
        self.runs
            .put(&id, encode(&*after)?)
            .await
            .map_err(|e| unavailable("cannot write the run", e))?;
        let report = after.to_report(duration);
        self.history
            .put(&id, encode(&report)?)
            .await
            .map_err(|e| unavailable("cannot write the history", e))?;
        if let Some(key) = &after.key {
            let ttl = after.ttl.unwrap_or(self.options.default_ttl);
            let expires = time::unix_ms(SystemTime::now() + ttl);
            let value = encode(&KeyValue { run_id: after.run_id, done: Some((report, expires)) })?;
            // A plain KV put has no per-key TTL: publish to the bucket's subject with one.
            let subject = format!("$KV.{}.{}", self.keys_bucket, key_name(key));
            let msg = jetstream::message::PublishMessage::build()
                .payload(value)
                .ttl(ttl.max(Duration::from_secs(1)));
            let ack = self
                .js
                .send_publish(subject, msg)
                .await
                .map_err(|e| unavailable("cannot write the key", e))?;
            ack.await.map_err(|e| unavailable("cannot write the key", e))?;
        }
        self.runs.delete(&id).await.map_err(|e| unavailable("cannot retire the run", e))?;
        Ok(())
    }

    async fn report(&self, run_id: Uuid) -> Result<Option<RunReport>, StoreError> {
        let id = run_id.to_string();
        if let Some(b) =
            self.runs.get(&id).await.map_err(|e| unavailable("cannot read the run", e))?
        {
            let rec: RunRecord = decode(&b)?;
            let elapsed = SystemTime::now().duration_since(rec.started_at).unwrap_or_default();
            return Ok(Some(rec.to_report(elapsed)));
        }
        match self.history.get(&id).await.map_err(|e| unavailable("cannot read the history", e))? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }
}

impl Store for JetStreamStore {
    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>> {
        let (inner, record) = (self.inner.clone(), record.clone());
        Pending::later(async move {
            if let Some(key) = &record.key {
                // Claim first: the key names the run before the run exists, and a
                // caller that finds the key waits for the run's report.
                if let Created::Existing { run_id, report } = inner.claim(&record, key).await? {
                    return Ok(Created::Existing { run_id, report });
                }
            }
            let id = record.run_id.to_string();
            inner
                .runs
                .put(&id, encode(&*record)?)
                .await
                .map_err(|e| unavailable("cannot write the run", e))?;
            Ok(Created::New)
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
                    let value = encode(&*after)?;
                    inner
                        .runs
                        .put(run_id.to_string(), value)
                        .await
                        .map_err(|e| unavailable("cannot write the run", e))?;
                    Ok(())
                }
            }
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
            if inner.report(run_id).await?.is_none() {
                return Err(StoreError::NotFound(run_id));
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

    fn live_runs(&self) -> BoxFuture<'static, Result<Vec<Arc<RunRecord>>, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut keys =
                inner.runs.keys().await.map_err(|e| unavailable("cannot list runs", e))?;
            let mut out = Vec::new();
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| unavailable("cannot list runs", e))?;
                let Some(b) =
                    inner.runs.get(&key).await.map_err(|e| unavailable("cannot read a run", e))?
                else {
                    continue;
                };
                let rec: RunRecord = decode(&b)?;
                if rec.phase == Phase::Finished {
                    // Died between its final record and its retirement: finish the job.
                    let duration = rec.duration.unwrap_or_default();
                    inner.finish(Arc::new(rec), duration).await?;
                    continue;
                }
                out.push(Arc::new(rec));
            }
            Ok(out)
        })
    }
}
