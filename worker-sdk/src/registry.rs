//! The cluster's flow registry, in two JetStream KV buckets named after the
//! subject prefix:
//!
//! | bucket | key | value |
//! |---|---|---|
//! | `{prefix}_flows` | `{flow}.{version}` | [`FlowRegistration`]: the definition, written once per version |
//! | `{prefix}_workers` | worker id | [`WorkerPresence`]: what a live worker serves; renewed every 2 s, expires 6 s after the last renewal |
//!
//! Workers register the definitions they serve and announce themselves;
//! coordinators watch both buckets, so a coordinator needs no flow file and
//! knows which versions have a live worker. `orchestrix flows apply` writes
//! definitions from TOML for workers written in other languages.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use orchestrix_proto::{
    FlowDef, FlowError, FlowRegistration, ServedFlow, WorkerPresence, decode, encode, time,
};

/// How long a worker's presence lasts without renewal.
pub const PRESENCE_TTL: Duration = Duration::from_secs(6);

/// This host's clock, in nanoseconds since the Unix epoch.
fn unix_nanos_now() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// Whether a liveness entry (a worker's presence, a coordinator's
/// heartbeat) written at `written` (the server's timestamp, ns since the
/// epoch) is dead whatever the server says: it is older, by more than
/// `after` (its TTL and a margin), than `newest`, a renewal the same server
/// stamped lately (the newest entry of its bucket, or the reader's own
/// heartbeat). A live process renews well within its TTL, so only a dead
/// one's entry can be that old; a nats-server that crashed was seen to bring
/// such entries back (its per-key TTL state, rebuilt on restart, missed
/// some), and a dead coordinator that looks alive keeps its runs from being
/// taken over. Both times are the server's: clocks elsewhere do not matter.
/// The margin must outlast a pause of the server or of the readers (no one
/// renews meanwhile): a pause must not read as a death.
pub fn outlived(written: i128, newest: i128, after: Duration) -> bool {
    written < newest.saturating_sub(i128::try_from(after.as_nanos()).unwrap_or(i128::MAX))
}

/// How often a worker renews its presence.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(2);

/// The registry could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// JetStream is not reachable or refused an operation.
    #[error("flow registry unavailable: {0}")]
    Unavailable(String),
    /// The server is too old for the registry (it needs KV per-key TTL).
    #[error(
        "nats-server {0} is too old for the flow registry: it needs 2.11 or newer (KV per-key TTL)"
    )]
    TooOld(String),
    /// Another definition is registered under the same flow and version.
    #[error(
        "flow `{flow}` version `{version}` is already registered with a different definition (registered by {by}); change the version label or keep the definition"
    )]
    Conflict {
        /// The flow.
        flow: String,
        /// The version.
        version: String,
        /// Who registered the existing one.
        by: String,
    },
    /// The definition is not valid.
    #[error(transparent)]
    Invalid(#[from] FlowError),
    /// The definition does not fit in one NATS message.
    #[error(
        "flow `{flow}` is {size} bytes encoded, more than the {limit} bytes a registration may take (the server's max_payload, less room for headers): split it into smaller flows"
    )]
    TooLarge {
        /// The flow.
        flow: String,
        /// Its encoded size.
        size: usize,
        /// The most a registration may take.
        limit: usize,
    },
    /// A version label that looks like a definition hash.
    #[error(
        "version label `{0}` looks like a definition hash (16 hex digits), which only a definition itself may have; choose another label"
    )]
    Label(String),
    /// An entry could not be read.
    #[error("unreadable registry entry {key}: {reason}")]
    Corrupt {
        /// The KV key.
        key: String,
        /// Why.
        reason: String,
    },
}

fn unavailable(what: &str, e: impl fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("{what}: {e}"))
}

/// A change seen by [`Registry::watch_workers`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PresenceChange {
    /// A worker announced (or renewed) what it serves.
    Up(WorkerPresence),
    /// A worker left or its presence expired (by KV key).
    Gone(String),
}

/// Handle on the registry buckets.
#[derive(Clone)]
pub struct Registry {
    js: jetstream::Context,
    flows: kv::Store,
    workers: kv::Store,
    workers_bucket: String,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("workers", &self.workers_bucket).finish_non_exhaustive()
    }
}

/// True for a server version of 2.11 or newer (an unreadable one passes).
pub fn server_supports_ttl(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (2, 11),
        _ => true,
    }
}

/// Publishes `value` to a KV key with a per-message TTL (a plain KV put
/// cannot carry one). The bucket needs `limit_markers` so that watchers see
/// the expiry.
pub async fn put_with_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    value: Bytes,
    ttl: Duration,
) -> Result<(), String> {
    let msg = jetstream::message::PublishMessage::build()
        .payload(value)
        .ttl(ttl.max(Duration::from_secs(1)));
    let ack = js
        .send_publish(format!("$KV.{bucket}.{key}"), msg)
        .await
        .map_err(|e| format!("cannot publish: {e}"))?;
    ack.await.map_err(|e| format!("publish not acknowledged: {e}"))?;
    Ok(())
}

/// A definition is valid, and an explicit label cannot pass for a hash (16
/// hex digits): a label could otherwise take the version of another
/// definition before it is registered.
fn validate_label(def: &FlowDef) -> Result<(), RegistryError> {
    def.validate()?;
    if let Some(label) = &def.version
        && label.len() == 16
        && label.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(RegistryError::Label(label.to_string()));
    }
    Ok(())
}

/// A KV key for a worker id (which holds a host name: keep what KV allows).
pub fn worker_key(worker: &str) -> String {
    let key: String = worker
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if key.is_empty() { "_".into() } else { key }
}

impl Registry {
    /// Opens the registry buckets under `prefix` (a subject prefix; dots
    /// become `_` in bucket names), creating them with `replicas` when missing.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Registry, RegistryError> {
        let version = client.server_info().version;
        if !server_supports_ttl(&version) {
            return Err(RegistryError::TooOld(version));
        }
        let js =
            jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client.clone());
        let p = prefix.replace('.', "_");
        let open = |name: String, history: i64, markers: bool| {
            let js = js.clone();
            async move {
                let cfg = kv::Config {
                    bucket: name.clone(),
                    history,
                    num_replicas: replicas.max(1),
                    storage: jetstream::stream::StorageType::File,
                    limit_markers: markers.then_some(Duration::from_secs(1)),
                    ..Default::default()
                };
                if let Ok(mut store) = js.get_key_value(&name).await {
                    // A worker may have created it first, with fewer replicas
                    // than a coordinator of a cluster asks for: raise, never lower.
                    let have =
                        store.status().await.map(|s| s.info.config.num_replicas).unwrap_or(1);
                    if have < cfg.num_replicas {
                        store = js
                            .create_or_update_key_value(cfg)
                            .await
                            .map_err(|e| unavailable(&format!("cannot update bucket {name}"), e))?;
                    }
                    return Ok(store);
                }
                match js.create_key_value(cfg).await {
                    Ok(store) => Ok(store),
                    // Someone else created it in between.
                    Err(e) => js
                        .get_key_value(&name)
                        .await
                        .map_err(|_| unavailable(&format!("cannot open bucket {name}"), e)),
                }
            }
        };
        let flows = open(format!("{p}_flows"), 1, false).await?;
        let workers_bucket = format!("{p}_workers");
        let workers = open(workers_bucket.clone(), 1, true).await?;
        Ok(Registry { js, flows, workers, workers_bucket })
    }

    /// Turns off rollups on the flows bucket (KV buckets allow them): one
    /// message with a `Nats-Rollup: all` header on a key a worker may write
    /// would otherwise erase every flow's registration. The registry never
    /// purges, so nothing it does needs them. Needs the right to update
    /// streams: the coordinator does it at start (a worker's user may not).
    /// The presence bucket keeps them: nats-server requires rollups where
    /// expiries leave markers, and a presence erased that way is back
    /// within a renewal (2 s).
    pub async fn forbid_rollups(&self) -> Result<(), RegistryError> {
        let mut stream = self.flows.stream.clone();
        let info = stream.info().await.map_err(|e| unavailable("cannot read a bucket", e))?;
        if !info.config.allow_rollup {
            return Ok(());
        }
        let mut config = info.config.clone();
        config.allow_rollup = false;
        self.js.update_stream(config).await.map_err(|e| {
            unavailable(&format!("cannot turn off rollups on {}", self.flows.name), e)
        })?;
        Ok(())
    }

    /// Opens the registry buckets under `prefix` without creating them: for
    /// reading (a wrong prefix is an error, not two new buckets).
    pub async fn open_existing(
        client: async_nats::Client,
        prefix: &str,
    ) -> Result<Registry, RegistryError> {
        let js =
            jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client.clone());
        let p = prefix.replace('.', "_");
        let get = |name: String| {
            let js = js.clone();
            async move {
                js.get_key_value(&name).await.map_err(|e| {
                    RegistryError::Unavailable(format!(
                        "no flow registry under prefix `{prefix}` (bucket {name}: {e}); is --prefix right, and has a worker or coordinator started with it?"
                    ))
                })
            }
        };
        let flows = get(format!("{p}_flows")).await?;
        let workers_bucket = format!("{p}_workers");
        let workers = get(workers_bucket.clone()).await?;
        Ok(Registry { js, flows, workers, workers_bucket })
    }

    /// Checks that `def` can be registered: valid, and not contradicting a
    /// registration under the same version. Writes nothing.
    pub async fn check(&self, def: &FlowDef) -> Result<(), RegistryError> {
        validate_label(def)?;
        self.encode(&Self::registration_of(def, ""))?;
        let key = format!("{}.{}", def.name, def.version());
        match self.registration(&key).await? {
            Some(existing) if existing.flow != *def => Err(RegistryError::Conflict {
                flow: def.name.to_string(),
                version: def.version().to_string(),
                by: existing.registered_by,
            }),
            _ => Ok(()),
        }
    }

    /// Registers `def` under its version. Registering the same definition
    /// again is harmless (the first registration is kept); a different
    /// definition under a version already taken is refused.
    pub async fn register(
        &self,
        def: &FlowDef,
        by: &str,
    ) -> Result<FlowRegistration, RegistryError> {
        validate_label(def)?;
        let reg = Self::registration_of(def, by);
        let version = reg.version.clone();
        let key = format!("{}.{}", def.name, version);
        let bytes = self.encode(&reg)?;
        match self.flows.create(&key, Bytes::from(bytes)).await {
            Ok(_) => Ok(reg),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let existing = self.registration(&key).await?.ok_or_else(|| {
                    RegistryError::Unavailable(format!("{key} exists but cannot be read"))
                })?;
                if existing.flow != *def {
                    return Err(RegistryError::Conflict {
                        flow: def.name.to_string(),
                        version: version.to_string(),
                        by: existing.registered_by,
                    });
                }
                Ok(existing)
            }
            Err(e) => Err(unavailable(&format!("cannot register {key}"), e)),
        }
    }

    fn registration_of(def: &FlowDef, by: &str) -> FlowRegistration {
        FlowRegistration {
            flow: def.clone(),
            version: def.version(),
            registered_at_ms: time::unix_ms(SystemTime::now()),
            registered_by: by.to_owned(),
        }
    }

    /// The registration's bytes, if they fit in one message (with room for
    /// the subject and headers a KV put adds).
    fn encode(&self, reg: &FlowRegistration) -> Result<Vec<u8>, RegistryError> {
        let bytes = encode(reg).map_err(|e| unavailable("cannot encode", e))?;
        // The server's (the client's default until its first INFO).
        let limit = self.js.client().max_payload().saturating_sub(1024);
        if bytes.len() > limit {
            return Err(RegistryError::TooLarge {
                flow: reg.flow.name.to_string(),
                size: bytes.len(),
                limit,
            });
        }
        Ok(bytes)
    }

    async fn registration(&self, key: &str) -> Result<Option<FlowRegistration>, RegistryError> {
        let bytes = self.flows.get(key).await.map_err(|e| unavailable("cannot read", e))?;
        bytes
            .map(|b| {
                decode::<FlowRegistration>(&b)
                    .map_err(|e| RegistryError::Corrupt { key: key.into(), reason: e.to_string() })
            })
            .transpose()
    }

    /// Every registered version of every flow, oldest first. An entry that
    /// cannot be read (written by something else) is skipped with a warning.
    pub async fn registrations(&self) -> Result<Vec<FlowRegistration>, RegistryError> {
        let mut keys = self.flows.keys().await.map_err(|e| unavailable("cannot list flows", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("cannot list flows", e))?;
            match self.registration(&key).await {
                Ok(Some(reg)) => out.push(reg),
                Ok(None) => {}
                Err(e @ RegistryError::Corrupt { .. }) => tracing::warn!(error = %e, "skipped"),
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|r| r.registered_at_ms);
        Ok(out)
    }

    /// Announces (or renews) what a worker serves, for [`PRESENCE_TTL`].
    pub async fn announce(&self, presence: &WorkerPresence) -> Result<(), RegistryError> {
        let bytes = encode(presence).map_err(|e| unavailable("cannot encode", e))?;
        let key = worker_key(&presence.worker);
        put_with_ttl(&self.js, &self.workers_bucket, &key, Bytes::from(bytes), PRESENCE_TTL)
            .await
            .map_err(RegistryError::Unavailable)
    }

    /// Removes a worker's presence (it is leaving).
    pub async fn withdraw(&self, worker: &str) -> Result<(), RegistryError> {
        self.workers
            .delete(worker_key(worker))
            .await
            .map_err(|e| unavailable("cannot withdraw the worker", e))
    }

    /// The live workers: those whose presence is in the bucket and not
    /// [`outlived`] (the server may keep a dead worker's entry past its TTL
    /// after a crash).
    pub async fn presences(&self) -> Result<Vec<WorkerPresence>, RegistryError> {
        let mut keys =
            self.workers.keys().await.map_err(|e| unavailable("cannot list workers", e))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| unavailable("cannot list workers", e))?;
            let entry =
                self.workers.entry(&key).await.map_err(|e| unavailable("cannot read", e))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            if let Ok(p) = decode::<WorkerPresence>(&entry.value) {
                found.push((entry.created.unix_timestamp_nanos(), p));
            }
        }
        // The newest entry stands for the server's clock; when every entry
        // is stale (no worker lives), this host's clock, five minutes back
        // for skew, stands in.
        let newest = found.iter().map(|(at, _)| *at).max().unwrap_or_default();
        let newest = newest.max(unix_nanos_now().saturating_sub(300_000_000_000));
        Ok(found
            .into_iter()
            .filter(|(at, _)| !outlived(*at, newest, PRESENCE_TTL + Duration::from_secs(2)))
            .map(|(_, p)| p)
            .collect())
    }

    /// Every registration, then each new one as it is written.
    pub async fn watch_flows(
        &self,
    ) -> Result<impl Stream<Item = FlowRegistration> + Send + 'static, RegistryError> {
        let watch = self
            .flows
            .watch_with_history(">")
            .await
            .map_err(|e| unavailable("cannot watch flows", e))?;
        Ok(watch.filter_map(|entry| async move {
            let entry = entry.ok()?;
            if entry.operation != kv::Operation::Put {
                return None;
            }
            match decode::<FlowRegistration>(&entry.value) {
                Ok(reg) => Some(reg),
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "unreadable flow registration");
                    None
                }
            }
        }))
    }

    /// Every live worker, then each change as it happens.
    pub async fn watch_workers(
        &self,
    ) -> Result<impl Stream<Item = PresenceChange> + Send + 'static, RegistryError> {
        let watch = self
            .workers
            .watch_with_history(">")
            .await
            .map_err(|e| unavailable("cannot watch workers", e))?;
        Ok(watch.filter_map(|entry| async move {
            let entry = entry.ok()?;
            if entry.operation != kv::Operation::Put {
                return Some(PresenceChange::Gone(entry.key));
            }
            decode::<WorkerPresence>(&entry.value).ok().map(PresenceChange::Up)
        }))
    }
}

/// The steps of `def` (at `version`) that none of `workers` serves: a
/// version is **served** when this is empty — every step has a live worker
/// for it (a worker of that version, or one serving every version).
pub fn unserved_steps<'a>(
    def: &FlowDef,
    version: &str,
    workers: impl IntoIterator<Item = &'a WorkerPresence>,
) -> Vec<Arc<str>> {
    let mut missing: Vec<Arc<str>> = def.steps.iter().map(|s| s.name.clone()).collect();
    for p in workers {
        for s in p
            .flows
            .iter()
            .filter(|s| s.flow == def.name && s.version.as_deref().is_none_or(|v| v == version))
        {
            missing.retain(|m| !s.steps.contains(m));
        }
    }
    missing
}

/// Whether a worker's presence serves (some step of) a version of a flow.
pub fn serves(presence: &WorkerPresence, flow: &str, version: &str) -> bool {
    presence
        .flows
        .iter()
        .any(|s| &*s.flow == flow && s.version.as_deref().is_none_or(|v| v == version))
}

/// A flow and version (`None`: every version) a worker serves steps of.
type Served = (String, Option<Arc<str>>);

/// Groups a worker's step registrations into what it announces.
pub(crate) fn served(
    regs: impl Iterator<Item = (String, Option<Arc<str>>, String)>,
) -> Vec<ServedFlow> {
    let mut by: HashMap<Served, Vec<Arc<str>>> = HashMap::new();
    for (flow, version, step) in regs {
        by.entry((flow, version)).or_default().push(step.into());
    }
    let mut out: Vec<ServedFlow> = by
        .into_iter()
        .map(|((flow, version), steps)| ServedFlow { flow: flow.into(), version, steps })
        .collect();
    out.sort_by(|a, b| (&a.flow, &a.version).cmp(&(&b.flow, &b.version)));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Dead once more than `after` behind the newest renewal; live otherwise.
    #[test]
    fn an_entry_is_dead_once_that_far_behind_the_newest() {
        use super::outlived;
        let s = |secs: i128| secs * 1_000_000_000;
        let after = Duration::from_secs(8);
        let newest = s(1_000_000);
        assert!(!outlived(newest, newest, after));
        assert!(!outlived(newest - s(8), newest, after), "within the margin");
        assert!(outlived(newest - s(9), newest, after), "past it");
        assert!(!outlived(newest + s(60), newest, after), "newer than the reference");
    }

    #[test]
    fn server_versions() {
        use super::server_supports_ttl as ok;
        assert!(ok("2.15.1") && ok("2.11.0") && ok("v2.12.0-beta") && ok("3.0.0"));
        assert!(!ok("2.9.15") && !ok("2.10.22") && !ok("1.4.1"));
        assert!(ok("nonsense"));
    }
}
