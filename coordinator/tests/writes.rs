//! What a run writes to its store, and when: a plain run is created holding
//! its first decision (one write less), a keyed run is created bare (its
//! key decides first), and a start whose write fails runs nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::paused;
use futures::future::BoxFuture;
use orchestrix_coordinator::record::{RunRecord, Transition};
use orchestrix_coordinator::slots::Grant;
use orchestrix_coordinator::{
    ActorsHere, Bus, BusError, Coordinator, Created, Dispatched, FlowDef, ListFilter, Liveness,
    MemoryStore, Pending, ReplyTo, RunOptions, RunReport, RunStatus, StepDef, StepStatus, Store,
    StoreError, create,
};
use orchestrix_proto::{OutcomeResult, Payload, StepCommand};
use uuid::Uuid;

/// A memory store that notes every write, and can refuse or slow down
/// creations.
#[derive(Default)]
struct Noting {
    inner: MemoryStore,
    writes: Mutex<Vec<String>>,
    refuse_creates: AtomicBool,
    slow_creates: Option<Duration>,
}

impl Noting {
    fn writes(&self) -> Vec<String> {
        self.writes.lock().unwrap().clone()
    }
}

/// A record as `step:status` of each step.
fn steps(r: &RunRecord) -> String {
    let s: Vec<_> = r.steps.iter().map(|s| format!("{}:{}", s.name, s.status)).collect();
    s.join(" ")
}

fn transition(t: &Transition) -> String {
    let name = format!("{t:?}");
    name.split([' ', '{', '(']).next().unwrap_or_default().to_owned()
}

impl Store for Noting {
    fn create(&self, record: &Arc<RunRecord>) -> Pending<Result<Created, StoreError>> {
        self.writes.lock().unwrap().push(format!("create {}", steps(record)));
        if self.refuse_creates.load(Ordering::SeqCst) {
            return Pending::Ready(Err(StoreError::Unavailable("refused by the test".into())));
        }
        if let Some(pause) = self.slow_creates {
            let created = self.inner.create(record);
            return Pending::later(async move {
                tokio::time::sleep(pause).await;
                created.resolve().await
            });
        }
        self.inner.create(record)
    }
    fn apply(
        &self,
        run_id: Uuid,
        batch: &[Transition],
        after: &Arc<RunRecord>,
    ) -> Pending<Result<(), StoreError>> {
        let names: Vec<_> = batch.iter().map(transition).collect();
        self.writes.lock().unwrap().push(format!("apply {}", names.join("+")));
        self.inner.apply(run_id, batch, after)
    }
    fn report(&self, run_id: Uuid) -> Pending<Result<Option<RunReport>, StoreError>> {
        self.inner.report(run_id)
    }
    fn wait(&self, run_id: Uuid) -> BoxFuture<'static, Result<RunReport, StoreError>> {
        self.inner.wait(run_id)
    }
    fn list(&self, filter: ListFilter) -> BoxFuture<'static, Result<Vec<RunReport>, StoreError>> {
        self.inner.list(filter)
    }
    fn claim_orphans(
        &self,
        flows: Arc<[Arc<str>]>,
        here: Arc<dyn ActorsHere>,
    ) -> BoxFuture<'static, Result<Vec<Arc<RunRecord>>, StoreError>> {
        self.inner.claim_orphans(flows, here)
    }
    fn reopen(
        &self,
        run_id: Uuid,
    ) -> BoxFuture<'static, Result<Option<Arc<RunRecord>>, StoreError>> {
        self.inner.reopen(run_id)
    }
    fn note_late(
        &self,
        run_id: Uuid,
        line: String,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.inner.note_late(run_id, line)
    }
    fn quarantine(
        &self,
        record: &Arc<RunRecord>,
        reason: String,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.quarantine(record, reason)
    }
    fn acquire(
        &self,
        slot: &str,
        limit: u32,
        holder: Uuid,
    ) -> BoxFuture<'static, Result<Grant, StoreError>> {
        self.inner.acquire(slot, limit, holder)
    }
    fn release(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.release(slot, holder)
    }
    fn granted(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.granted(slot, holder)
    }
    fn placed(&self, slot: &str, holder: Uuid) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.inner.placed(slot, holder)
    }
}

/// A three-step flow whose steps note that they ran.
fn flow(ran: &Arc<Mutex<Vec<&'static str>>>) -> orchestrix_coordinator::Flow<u32> {
    let mut f = create::<u32>("three");
    for name in ["a", "b", "c"] {
        let ran = ran.clone();
        f = f.step(name, move |_| {
            ran.lock().unwrap().push(name);
            async { Ok(()) }
        });
    }
    f
}

#[test]
fn a_plain_run_is_created_with_its_first_attempt_and_written_once_a_step() {
    paused(|| async {
        let store = Arc::new(Noting::default());
        let ran = Arc::default();
        let c = Coordinator::builder().flow(&flow(&ran)).store(store.clone()).build().unwrap();
        let report = c.run("three", &1u32, RunOptions::new()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert!(report.steps.iter().all(|s| s.status == StepStatus::Completed && s.attempts == 1));
        assert_eq!(
            store.writes(),
            [
                // The first step's attempt is in the record the start writes:
                // its command goes out after one write, not two.
                "create a:running b:not_run c:not_run",
                "apply StepCompleted+AttemptStarted",
                "apply StepCompleted+AttemptStarted",
                "apply StepCompleted+Finished",
            ]
        );
    });
}

#[test]
fn a_keyed_run_is_created_bare_and_its_key_decides_first() {
    paused(|| async {
        let store = Arc::new(Noting::default());
        let ran = Arc::default();
        let c = Coordinator::builder().flow(&flow(&ran)).store(store.clone()).build().unwrap();
        let first = c.run("three", &1u32, RunOptions::new().key("order-1")).await.unwrap();
        let again = c.start("three", &1u32, RunOptions::new().key("order-1")).await.unwrap();
        assert!(again.is_duplicate());
        assert_eq!(again.report().await.unwrap().run_id, first.run_id);
        let writes = store.writes();
        assert_eq!(writes[0], "create a:not_run b:not_run c:not_run");
        assert_eq!(writes[1], "apply AttemptStarted");
        // The duplicate start wrote its bare record, and nothing ran for it.
        assert_eq!(writes.last().unwrap(), "create a:not_run b:not_run c:not_run");
        assert_eq!(*ran.lock().unwrap(), ["a", "b", "c"]);
    });
}

#[test]
fn a_start_whose_write_fails_runs_nothing() {
    paused(|| async {
        let store = Arc::new(Noting::default());
        store.refuse_creates.store(true, Ordering::SeqCst);
        let ran: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let c = Coordinator::builder().flow(&flow(&ran)).store(store.clone()).build().unwrap();
        let err = c.start("three", &1u32, RunOptions::new()).await.err().unwrap();
        assert!(err.to_string().contains("refused by the test"), "{err}");
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(ran.lock().unwrap().is_empty(), "a step ran for a run never written");
        assert!(c.list(Default::default()).await.unwrap().is_empty());
    });
}

#[test]
fn a_queued_run_is_created_bare() {
    paused(|| async {
        let store = Arc::new(Noting::default());
        let ran = Arc::default();
        let c = Coordinator::builder().flow(&flow(&ran)).store(store.clone()).build().unwrap();
        let options = RunOptions::new().concurrency_key("customer-7");
        let report = c.run("three", &1u32, options).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert_eq!(store.writes()[0], "create a:not_run b:not_run c:not_run");
    });
}

/// A bus whose workers answer at once, noting how much of each command's
/// ack window (its start-by time) was left when it was sent.
struct Stamped(Arc<Mutex<Vec<i64>>>);

const ACK_WINDOW: Duration = Duration::from_secs(2);

impl Bus for Stamped {
    fn dispatch(&self, cmd: StepCommand, _reply: &ReplyTo) -> Result<Dispatched, BusError> {
        let now = orchestrix_proto::time::unix_ms(SystemTime::now());
        let left = cmd.start_by_ms.map_or(i64::MAX, |by| by as i64 - now as i64);
        self.0.lock().unwrap().push(left);
        Ok(Dispatched::Local(Box::pin(async {
            OutcomeResult::Completed { output: Payload::nil() }
        })))
    }

    fn liveness(&self) -> Liveness {
        Liveness::Remote {
            ack_timeout: ACK_WINDOW,
            heartbeat_timeout: Duration::from_secs(10),
            timeout_grace: Duration::from_secs(1),
            clock_skew: Duration::from_millis(500),
            worker_wait: Duration::from_secs(300),
        }
    }
}

/// The first decision is taken before the run is created, but its command
/// is stamped when it is sent: a slow creation does not eat the worker's
/// ack window (a worker would refuse a command past its start-by time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_creation_leaves_step_one_its_whole_ack_window() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut def = FlowDef::new("two");
    def.steps.push(StepDef::new("a"));
    def.steps.push(StepDef::new("b"));
    let store = Noting { slow_creates: Some(Duration::from_millis(2500)), ..Noting::default() };
    let c = Coordinator::builder()
        .bus(Stamped(sent.clone()))
        .flow_def(def)
        .store(store)
        .build()
        .unwrap();
    let report = c.run("two", &1u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    let window = ACK_WINDOW.as_millis() as i64;
    assert!(sent.iter().all(|left| *left > window - 500), "ms of the window left: {sent:?}");
}
