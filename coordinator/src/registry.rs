//! A coordinator's live view of the cluster's flow registry: every
//! registered version of every flow, and the workers serving each. New runs
//! take the newest version with a live worker; resumed runs look up their own.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use orchestrix_proto::{FlowDef, FlowRegistration, WorkerPresence};
use orchestrix_worker::registry::{
    PRESENCE_TTL, PresenceChange, Registry, RegistryError, serves, unserved_steps, worker_key,
};

use crate::Hooks;
use crate::machine::FlowPlan;

/// A worker that has not renewed its presence for this long counts as gone,
/// even if the expiry of its entry was missed.
const STALE_AFTER: Duration = Duration::from_secs(PRESENCE_TTL.as_secs() + 2);

/// One registered version of a flow.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FlowVersion {
    /// Its registration.
    pub registration: FlowRegistration,
    /// The live workers serving it (by id).
    pub workers: Vec<String>,
    /// Its steps that no live worker serves (empty: the version is served,
    /// and new runs may take it).
    pub unserved: Vec<Arc<str>>,
}

struct Version {
    registration: FlowRegistration,
    plan: Arc<FlowPlan>,
}

#[derive(Default)]
struct State {
    /// Versions of each flow, oldest registration first.
    flows: HashMap<Arc<str>, Vec<Version>>,
    /// By KV key: the presence and when it was last renewed.
    workers: HashMap<String, (WorkerPresence, Instant)>,
}

impl State {
    fn live(&self) -> impl Iterator<Item = &WorkerPresence> {
        let now = Instant::now();
        self.workers
            .values()
            .filter(move |(_, seen)| now.duration_since(*seen) < STALE_AFTER)
            .map(|(p, _)| p)
    }

    fn workers_of(&self, flow: &str, version: &str) -> Vec<String> {
        self.live().filter(|p| serves(p, flow, version)).map(|p| p.worker.clone()).collect()
    }

    fn unserved(&self, v: &Version) -> Vec<Arc<str>> {
        unserved_steps(&v.registration.flow, &v.registration.version, self.live())
    }
}

/// The registry as one coordinator sees it, kept current by a watch.
pub struct RegistryView {
    state: RwLock<State>,
    hooks: Vec<Arc<dyn Hooks>>,
    /// Bumped when a flow name appears.
    names: tokio::sync::watch::Sender<usize>,
}

impl fmt::Debug for RegistryView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("RegistryView")
            .field("flows", &state.flows.keys().collect::<Vec<_>>())
            .field("workers", &state.workers.len())
            .finish()
    }
}

/// Why no version of a flow can take a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pick {
    UnknownFlow,
    UnknownVersion,
}

impl RegistryView {
    /// A view with nothing in it yet; runs of its flows get `hooks`.
    pub(crate) fn new(hooks: Vec<Arc<dyn Hooks>>) -> Self {
        RegistryView {
            state: RwLock::new(State::default()),
            hooks,
            names: tokio::sync::watch::channel(0).0,
        }
    }

    /// Loads what the registry holds now, then follows its changes in a
    /// task (which re-opens its watches if they end). The view is complete
    /// when this returns.
    pub(crate) async fn follow(
        self: &Arc<Self>,
        registry: Registry,
    ) -> Result<tokio::task::JoinHandle<()>, RegistryError> {
        for reg in registry.registrations().await? {
            self.insert(reg);
        }
        for p in registry.presences().await? {
            self.worker_up(p);
        }
        let view = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            loop {
                let (flows, workers) =
                    match (registry.watch_flows().await, registry.watch_workers().await) {
                        (Ok(f), Ok(w)) => (f, w),
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::warn!(error = %e, "cannot watch the flow registry; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                let mut flows = std::pin::pin!(flows);
                let mut workers = std::pin::pin!(workers);
                loop {
                    let Some(view) = view.upgrade() else { return };
                    tokio::select! {
                        reg = flows.next() => match reg {
                            Some(reg) => view.insert(reg),
                            None => break,
                        },
                        change = workers.next() => match change {
                            Some(PresenceChange::Up(p)) => view.worker_up(p),
                            Some(PresenceChange::Gone(key)) => view.worker_gone(&key),
                            Some(_) => {}
                            None => break,
                        },
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a registration (a repeat of a known version changes nothing).
    pub(crate) fn insert(&self, reg: FlowRegistration) {
        if reg.flow.validate().is_err() || reg.flow.version() != reg.version {
            tracing::warn!(flow = %reg.flow.name, version = %reg.version, "ignoring a registration whose definition does not match its version");
            return;
        }
        let mut state = self.write();
        if !state.flows.contains_key(&reg.flow.name) {
            self.names.send_modify(|n| *n += 1);
        }
        let versions = state.flows.entry(reg.flow.name.clone()).or_default();
        if versions.iter().any(|v| v.registration.version == reg.version) {
            return;
        }
        tracing::info!(flow = %reg.flow.name, version = %reg.version, by = %reg.registered_by, "flow version registered");
        let plan = Arc::new(FlowPlan::new(reg.flow.clone(), self.hooks.clone()));
        versions.push(Version { registration: reg, plan });
        versions.sort_by_key(|v| v.registration.registered_at_ms);
    }

    fn worker_up(&self, p: WorkerPresence) {
        self.write().workers.insert(worker_key(&p.worker), (p, Instant::now()));
    }

    fn worker_gone(&self, key: &str) {
        self.write().workers.remove(key);
    }

    /// Changes whenever a flow name is registered for the first time.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<usize> {
        self.names.subscribe()
    }

    /// Names of the registered flows.
    pub(crate) fn names(&self) -> Vec<Arc<str>> {
        self.read().flows.keys().cloned().collect()
    }

    /// The plan of one version.
    pub(crate) fn plan(&self, flow: &str, version: &str) -> Option<Arc<FlowPlan>> {
        let state = self.read();
        let versions = state.flows.get(flow)?;
        versions.iter().find(|v| &*v.registration.version == version).map(|v| v.plan.clone())
    }

    /// The version a new run takes: `version` if given, else the newest
    /// with a live worker, else the newest (its run waits for a worker).
    pub(crate) fn pick(&self, flow: &str, version: Option<&str>) -> Result<Arc<FlowPlan>, Pick> {
        let state = self.read();
        let versions = state.flows.get(flow).ok_or(Pick::UnknownFlow)?;
        if let Some(wanted) = version {
            return versions
                .iter()
                .find(|v| &*v.registration.version == wanted)
                .map(|v| v.plan.clone())
                .ok_or(Pick::UnknownVersion);
        }
        // Every step must have a live worker: a service that serves one step
        // of a new version must not pull new runs onto it before the rest.
        let served = versions.iter().rev().find(|v| state.unserved(v).is_empty());
        served.or(versions.last()).map(|v| v.plan.clone()).ok_or(Pick::UnknownFlow)
    }

    /// Every version of every flow with its live workers (oldest first).
    pub fn versions(&self) -> Vec<FlowVersion> {
        let state = self.read();
        let mut out: Vec<FlowVersion> = state
            .flows
            .iter()
            .flat_map(|(name, versions)| {
                let state = &state;
                versions.iter().map(move |v| FlowVersion {
                    registration: v.registration.clone(),
                    workers: state.workers_of(name, &v.registration.version),
                    unserved: state.unserved(v),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.registration.flow.name, a.registration.registered_at_ms)
                .cmp(&(&b.registration.flow.name, b.registration.registered_at_ms))
        });
        out
    }

    /// The newest definition of a flow.
    pub(crate) fn newest(&self, flow: &str) -> Option<FlowDef> {
        self.read().flows.get(flow)?.last().map(|v| v.registration.flow.clone())
    }
}
