//! Where runs are kept: their records, reports and idempotency keys.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use orchestrix_proto::RunReport;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::ListFilter;
use crate::record::{RunRecord, Transition};
use crate::slots::{Grant, SlotState};

/// A value that is either here already or on its way. Lets the in-memory store
/// answer without allocating a future, while a networked one can take its time.
pub enum Pending<T> {
    /// Available now.
    Ready(T),
    /// Available when the future resolves.
    Later(BoxFuture<'static, T>),
}

impl<T> Pending<T> {
    /// Waits for the value.
    pub async fn resolve(self) -> T {
        match self {
            Pending::Ready(v) => v,
            Pending::Later(f) => f.await,
        }
    }

    /// Wraps a future.
    pub fn later(f: impl Future<Output = T> + Send + 'static) -> Self {
        Pending::Later(Box::pin(f))
    }
}

impl<T> fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pending::Ready(_) => "Pending::Ready",
            Pending::Later(_) => "Pending::Later",
        })
    }
}

/// What [`Store::create`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The run is new: start it.
    New,
    /// The idempotency key named a run that was never written (its start
    /// failed half-way): this start wrote it, under that run's id. Start this
    /// record.
    Adopted(Arc<RunRecord>),
    /// The idempotency key belongs to another run, live or finished within its ttl.
    Existing {
        /// That run's id.
        run_id: Uuid,
        /// Its report, when it has finished.
        report: Option<Box<RunReport>>,
    },
}

/// A store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or refused the write.
    #[error("run store unavailable: {0}")]
    Unavailable(String),
    /// No run with this id is kept.
    #[error("no run {0} in the store")]
    NotFound(Uuid),
    /// Another coordinator owns the run now (this one was presumed dead).
    #[error("run {0} was taken over by another coordinator")]
    Fenced(Uuid),
    /// The store refuses this value for good (too large for it, say):
    /// writing it again cannot succeed.
    #[error("run store refused the write: {0}")]
    Refused(String),
    /// A stored entry does not decode.
    #[error("corrupt store entry: {0}")]
    Corrupt(String),
    /// The server cannot hold this store (too old, say).
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    /// True when retrying the same operation cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Refused(_) | StoreError::Corrupt(_) | StoreError::Unsupported(_))
    }
}

/// Keeps runs. Every transition reaches the store before the command that
/// follows from it is sent.
pub trait Store: Send + Sync + 'static {
    /// Records a new run, claiming its idempotency key (`record.extras().key`) if any.
    /// Claim and creation are one atomic step.
    ///
    /// A run without an idempotency or concurrency key arrives here with
    /// its first decision already applied (step 1's attempt started, say):
    /// those transitions are in `record` and are never passed to
    /// [`Store::apply`]. A store that keeps deltas takes `record` as its
    /// first snapshot. Nothing follows from them until this resolves `Ok`.
    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>>;

    /// Records transitions of a run, in order. `after` is the record with the
    /// batch applied: a store may keep the deltas, the snapshot, or both.
    fn apply(
        &self,
        run_id: Uuid,
        batch: &[Transition],
        after: &Arc<RunRecord>,
    ) -> Pending<Result<(), StoreError>>;

    /// The run's report so far, if the run is kept.
    fn report(&self, run_id: Uuid) -> Pending<Result<Option<RunReport>, StoreError>>;

    /// Resolves with the run's final report once it has one.
    fn wait(&self, run_id: Uuid) -> BoxFuture<'static, Result<RunReport, StoreError>>;

    /// Recent runs (live and finished, as kept), newest first, filtered.
    fn list(&self, filter: ListFilter) -> BoxFuture<'static, Result<Vec<RunReport>, StoreError>>;

    /// Live runs of `flows` that no live coordinator drives, now claimed for
    /// this store's coordinator (atomically: of several coordinators asking,
    /// one gets each run). The coordinator resumes them. Runs of other flows
    /// are left to the coordinators that serve them. A store that dies with
    /// its process has none to offer.
    ///
    /// A run whose actor still lives in this process (`here`) is never
    /// claimed, even when the store no longer holds it for that actor (its
    /// coordinator was fenced while cut off): two actors would then drive
    /// one run. Such an actor is told to let go instead
    /// ([`ActorsHere::let_go`]), and a later scan claims the run.
    fn claim_orphans(
        &self,
        flows: Arc<[Arc<str>]>,
        here: Arc<dyn ActorsHere>,
    ) -> BoxFuture<'static, Result<Vec<Arc<RunRecord>>, StoreError>> {
        let _ = (flows, here);
        Box::pin(futures::future::ready(Ok(Vec::new())))
    }

    /// Makes a run that ended `compensation_failed` live again, owned by this
    /// store's coordinator, so its rollback can be resumed: its last record,
    /// or `None` when the store no longer keeps it (or never did). Of
    /// several coordinators asking at once, one gets it; the others get
    /// [`StoreError::Fenced`].
    fn reopen(
        &self,
        run_id: Uuid,
    ) -> BoxFuture<'static, Result<Option<Arc<RunRecord>>, StoreError>> {
        let _ = run_id;
        Box::pin(futures::future::ready(Ok(None)))
    }

    /// Notes a late answer in the history of a run that has ended (at most
    /// [`crate::record::MAX_LATE_NOTES`]); true if noted. A run still live is
    /// left alone: its owner notes late answers itself.
    fn note_late(
        &self,
        run_id: Uuid,
        line: String,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let _ = (run_id, line);
        Box::pin(futures::future::ready(Ok(false)))
    }

    /// Moves a run aside for an operator: it stops being live, `report`
    /// answers with [`RunRecord::quarantined_report`], and a caller waiting on
    /// it or on its idempotency key gets that report.
    fn quarantine(
        &self,
        record: &Arc<RunRecord>,
        reason: String,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let _ = (record, reason);
        Box::pin(futures::future::ready(Ok(())))
    }

    /// `holder` asks for `slot` (see [`crate::slots`]): granted while fewer
    /// than `limit` hold it and nobody waits, else queued in arrival order.
    /// Asking again is harmless. A store shared by coordinators shares the
    /// queue.
    fn acquire(
        &self,
        slot: &str,
        limit: u32,
        holder: Uuid,
    ) -> BoxFuture<'static, Result<Grant, StoreError>> {
        let _ = (slot, limit, holder);
        Box::pin(futures::future::ready(Err(no_slots())))
    }

    /// `holder` lets go of `slot`, or stops waiting for it; the first
    /// waiting take its place. Harmless if it held nothing.
    fn release(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        let _ = (slot, holder);
        Box::pin(futures::future::ready(Ok(())))
    }

    /// Resolves once `holder` holds `slot` (after [`Store::acquire`] queued
    /// it). [`StoreError::NotFound`] if it neither holds nor waits.
    fn granted(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        let _ = (slot, holder);
        Box::pin(futures::future::ready(Err(no_slots())))
    }

    /// Whether `holder` holds `slot` or waits for it. Read only: never
    /// changes the queue.
    fn placed(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<bool, StoreError>> {
        let _ = (slot, holder);
        Box::pin(futures::future::ready(Err(no_slots())))
    }
}

/// The run actors living in the process that scans for orphaned runs
/// (see [`Store::claim_orphans`]).
pub trait ActorsHere: Send + Sync {
    /// Whether an actor of `run_id` lives in this process (stopping included).
    fn is_live(&self, run_id: Uuid) -> bool;
    /// The store no longer holds `run_id` for its actor here: the actor stops
    /// without acting on anything more. Nothing if there is none.
    fn let_go(&self, run_id: Uuid);
}

/// No run actor lives here: a scan made outside a coordinator (tools, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoActors;

impl ActorsHere for NoActors {
    fn is_live(&self, _: Uuid) -> bool {
        false
    }
    fn let_go(&self, _: Uuid) {}
}

fn no_slots() -> StoreError {
    StoreError::Unsupported("this run store keeps no concurrency slots".into())
}

/// Limits of the in-memory store.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MemoryStoreOptions {
    /// Finished runs are forgotten after this long.
    pub retention: Duration,
    /// At most this many finished runs are kept; the oldest go first.
    pub max_finished: usize,
    /// Idempotency key lifetime after its run ended, when the run gave none.
    pub default_ttl: Duration,
}

impl Default for MemoryStoreOptions {
    fn default() -> Self {
        MemoryStoreOptions {
            retention: Duration::from_secs(3600),
            max_finished: 10_000,
            default_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The embedded store: runs and keys in this process's memory, sharded by run
/// id to keep threads apart. Finished runs are kept for a while for status
/// queries (see [`MemoryStoreOptions`]).
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    keys: Mutex<Keys>,
    slots: Arc<MemorySlots>,
    options: MemoryStoreOptions,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct Shard {
    /// Shared with the run's actor while it is live: one copy per run.
    runs: HashMap<Uuid, Arc<RunRecord>>,
    /// Callers waiting for a live run's report; most runs have none.
    waiters: HashMap<Uuid, Vec<oneshot::Sender<RunReport>>>,
    finished: VecDeque<(Instant, Uuid)>,
}

#[derive(Default)]
struct Keys {
    map: HashMap<String, KeyEntry>,
    inserts: u64,
}

struct KeyEntry {
    run_id: Uuid,
    /// Set when the run ended: its report and when the key frees up.
    done: Option<(RunReport, Instant)>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(MemoryStoreOptions::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a shard half-written (every
    // update is a single map operation), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// A store with the given limits.
    pub fn new(options: MemoryStoreOptions) -> Self {
        let shards = (0..16).map(|_| Mutex::new(Shard::default())).collect();
        MemoryStore {
            shards,
            keys: Mutex::new(Keys::default()),
            slots: Arc::default(),
            options,
            hasher: Default::default(),
        }
    }

    fn shard(&self, run_id: &Uuid) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one(run_id) as usize % self.shards.len()])
    }

    fn insert(&self, record: &Arc<RunRecord>) {
        self.shard(&record.run_id).runs.insert(record.run_id, record.clone());
    }

    /// Starts the ttl of a finished run's key and keeps its report with it.
    fn key_finished(&self, run_id: Uuid, key: &str, ttl: Option<Duration>, report: &RunReport) {
        let ttl = ttl.unwrap_or(self.options.default_ttl);
        if let Some(k) = lock(&self.keys).map.get_mut(key)
            && k.run_id == run_id
        {
            k.done = Some((report.clone(), Instant::now() + ttl));
        }
    }
}

impl Store for MemoryStore {
    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>> {
        let Some(key) = &record.extras().key else {
            self.insert(record);
            return Pending::Ready(Ok(Created::New));
        };
        let now = Instant::now();
        // Claim and insert under the keys lock: a concurrent caller with the
        // same key either sees no claim, or a claim whose run is in the store.
        let mut keys = lock(&self.keys);
        if let Some(k) = keys.map.get(key) {
            match &k.done {
                None => {
                    return Pending::Ready(Ok(Created::Existing {
                        run_id: k.run_id,
                        report: None,
                    }));
                }
                Some((report, expires)) if *expires > now => {
                    let report = Some(Box::new(report.clone()));
                    return Pending::Ready(Ok(Created::Existing { run_id: k.run_id, report }));
                }
                Some(_) => {} // expired: the key is free again
            }
        }
        keys.map.insert(key.clone(), KeyEntry { run_id: record.run_id, done: None });
        keys.inserts += 1;
        if keys.inserts.is_multiple_of(1024) {
            keys.map.retain(|_, k| k.done.as_ref().is_none_or(|(_, exp)| *exp > now));
        }
        self.insert(record);
        Pending::Ready(Ok(Created::New))
    }

    fn apply(
        &self,
        run_id: Uuid,
        batch: &[Transition],
        after: &Arc<RunRecord>,
    ) -> Pending<Result<(), StoreError>> {
        let mut shard = self.shard(&run_id);
        let Some(record) = shard.runs.get_mut(&run_id) else {
            return Pending::Ready(Err(StoreError::NotFound(run_id)));
        };
        *record = after.clone();
        let Some(Transition::Finished { duration, .. }) = batch.last() else {
            return Pending::Ready(Ok(()));
        };
        // Whatever the run still holds or waits for is let go with its end.
        for slot in &after.extras().slots {
            self.slots.release(slot, run_id);
        }
        let report = after.to_report(*duration);
        for w in shard.waiters.remove(&run_id).unwrap_or_default() {
            let _ = w.send(report.clone());
        }
        let key = after.extras().key.clone().map(|k| (k, after.extras().ttl));
        let now = Instant::now();
        shard.finished.push_back((now, run_id));
        let cutoff = now.checked_sub(self.options.retention);
        let max = self.options.max_finished / self.shards.len() + 1;
        while let Some(&(at, old)) = shard.finished.front() {
            if shard.finished.len() > max || cutoff.is_some_and(|c| at < c) {
                shard.finished.pop_front();
                shard.runs.remove(&old);
            } else {
                break;
            }
        }
        drop(shard);
        if let Some((key, ttl)) = key {
            self.key_finished(run_id, &key, ttl, &report);
        }
        Pending::Ready(Ok(()))
    }

    fn reopen(
        &self,
        run_id: Uuid,
    ) -> BoxFuture<'static, Result<Option<Arc<RunRecord>>, StoreError>> {
        let mut shard = self.shard(&run_id);
        let record = shard
            .runs
            .get(&run_id)
            .filter(|r| r.status == orchestrix_proto::RunStatus::CompensationFailed)
            .cloned();
        if record.is_some() {
            // Live again: not to be forgotten with the finished runs.
            shard.finished.retain(|(_, id)| *id != run_id);
        }
        Box::pin(futures::future::ready(Ok(record)))
    }

    fn report(&self, run_id: Uuid) -> Pending<Result<Option<RunReport>, StoreError>> {
        let shard = self.shard(&run_id);
        let report = shard.runs.get(&run_id).map(|record| {
            let elapsed = SystemTime::now().duration_since(record.started_at).unwrap_or_default();
            record.to_report(elapsed)
        });
        Pending::Ready(Ok(report))
    }

    fn list(&self, filter: ListFilter) -> BoxFuture<'static, Result<Vec<RunReport>, StoreError>> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for record in lock(shard).runs.values() {
                let elapsed = now.duration_since(record.started_at).unwrap_or_default();
                let report = record.to_report(elapsed);
                if filter.keeps(&report) {
                    out.push(report);
                }
            }
        }
        Box::pin(futures::future::ready(Ok(filter.finish(out))))
    }

    fn wait(&self, run_id: Uuid) -> BoxFuture<'static, Result<RunReport, StoreError>> {
        let rx = {
            let mut shard = self.shard(&run_id);
            let Some(record) = shard.runs.get(&run_id) else {
                return Box::pin(futures::future::ready(Err(StoreError::NotFound(run_id))));
            };
            if let Some(duration) = record.duration {
                let report = record.to_report(duration);
                return Box::pin(futures::future::ready(Ok(report)));
            }
            let (tx, rx) = oneshot::channel();
            shard.waiters.entry(run_id).or_default().push(tx);
            rx
        };
        Box::pin(async move {
            rx.await.map_err(|_| {
                StoreError::Unavailable(format!("run {run_id} was dropped from the store"))
            })
        })
    }

    fn acquire(
        &self,
        slot: &str,
        limit: u32,
        holder: Uuid,
    ) -> BoxFuture<'static, Result<Grant, StoreError>> {
        let grant =
            lock(&self.slots.map).entry(slot.to_owned()).or_default().acquire(holder, limit);
        Box::pin(futures::future::ready(Ok(grant)))
    }

    fn release(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        self.slots.release(slot, holder);
        Box::pin(futures::future::ready(Ok(())))
    }

    fn granted(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        let (slots, slot) = (self.slots.clone(), slot.to_owned());
        Box::pin(async move {
            loop {
                // Registered before looking, so a change in between wakes it.
                let changed = slots.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match lock(&slots.map).get(&slot) {
                    Some(s) if s.holds(holder) => return Ok(()),
                    Some(s) if s.knows(holder) => {}
                    _ => return Err(StoreError::NotFound(holder)),
                }
                changed.await;
            }
        })
    }

    fn placed(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<bool, StoreError>> {
        let known = lock(&self.slots.map).get(slot).is_some_and(|s| s.knows(holder));
        Box::pin(futures::future::ready(Ok(known)))
    }
}

/// The slots of the in-memory store, and a signal when any of them changes.
#[derive(Default)]
struct MemorySlots {
    map: Mutex<HashMap<String, SlotState>>,
    changed: tokio::sync::Notify,
}

impl MemorySlots {
    fn release(&self, slot: &str, holder: Uuid) {
        let mut map = lock(&self.map);
        if let Some(s) = map.get_mut(slot)
            && s.release(holder)
        {
            if s.holders.is_empty() {
                map.remove(slot);
            }
            self.changed.notify_waiters();
        }
    }
}

/// Shares one store between coordinators.
impl<S: Store + ?Sized> Store for Arc<S> {
    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>> {
        (**self).create(record)
    }
    fn apply(
        &self,
        run_id: Uuid,
        batch: &[Transition],
        after: &Arc<RunRecord>,
    ) -> Pending<Result<(), StoreError>> {
        (**self).apply(run_id, batch, after)
    }
    fn report(&self, run_id: Uuid) -> Pending<Result<Option<RunReport>, StoreError>> {
        (**self).report(run_id)
    }
    fn wait(&self, run_id: Uuid) -> BoxFuture<'static, Result<RunReport, StoreError>> {
        (**self).wait(run_id)
    }
    fn claim_orphans(
        &self,
        flows: Arc<[Arc<str>]>,
        here: Arc<dyn ActorsHere>,
    ) -> BoxFuture<'static, Result<Vec<Arc<RunRecord>>, StoreError>> {
        (**self).claim_orphans(flows, here)
    }
    fn quarantine(
        &self,
        record: &Arc<RunRecord>,
        reason: String,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).quarantine(record, reason)
    }
    fn note_late(
        &self,
        run_id: Uuid,
        line: String,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        (**self).note_late(run_id, line)
    }
    fn list(&self, filter: ListFilter) -> BoxFuture<'static, Result<Vec<RunReport>, StoreError>> {
        (**self).list(filter)
    }
    fn reopen(
        &self,
        run_id: Uuid,
    ) -> BoxFuture<'static, Result<Option<Arc<RunRecord>>, StoreError>> {
        (**self).reopen(run_id)
    }
    fn acquire(
        &self,
        slot: &str,
        limit: u32,
        holder: Uuid,
    ) -> BoxFuture<'static, Result<Grant, StoreError>> {
        (**self).acquire(slot, limit, holder)
    }
    fn release(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).release(slot, holder)
    }
    fn granted(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).granted(slot, holder)
    }
    fn placed(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<bool, StoreError>> {
        (**self).placed(slot, holder)
    }
}
