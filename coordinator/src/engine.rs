//! The threads that run actors.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use actix::{Actor, Context};
use actix_rt::{Arbiter, ArbiterHandle, System};

/// A pool of actix arbiters (one thread each) on which run actors live.
///
/// `Flow::run` and `Coordinator::run` work from any async runtime: on a plain
/// tokio runtime they use [`Engine::shared`], one arbiter per core started at
/// first use; called from a thread that already runs an actix arbiter (an actix
/// system, or a step handler), they spawn the run right there.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    arbiters: Vec<Lane>,
    next: AtomicUsize,
    system: Option<System>,
}

type Job = Box<dyn FnOnce() + Send>;

/// One arbiter and the actors waiting to be started on it. Starts are queued
/// and the arbiter is woken once per batch, not once per run: waking a parked
/// thread costs far more than starting an actor.
struct Lane {
    arbiter: ArbiterHandle,
    queue: Arc<LaneQueue>,
}

struct LaneQueue {
    queued: Mutex<Queued>,
    /// Room for starts: one permit per start queued and not yet taken by
    /// the arbiter, [`LANE_BACKLOG`] in all.
    room: tokio::sync::Semaphore,
}

#[derive(Default)]
struct Queued {
    jobs: Vec<Job>,
    /// How many of the jobs hold a permit of `room`.
    held: usize,
}

impl Default for LaneQueue {
    fn default() -> Self {
        LaneQueue { queued: Mutex::default(), room: tokio::sync::Semaphore::new(LANE_BACKLOG) }
    }
}

impl LaneQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts queued on one arbiter and not yet taken by it, past which
/// [`Engine::reserve`] waits. A flood of starts would otherwise queue without
/// bound, and what all those runs hold at once before their first step (the
/// queue, and then every run's first transition and command in flight
/// together) stays resident long after.
const LANE_BACKLOG: usize = 256;

impl Lane {
    /// Queues a job, holding one of the lane's permits or not.
    fn push(&self, job: Job, holds_permit: bool) {
        let first = {
            let mut q = self.queue.lock();
            q.jobs.push(job);
            q.held += usize::from(holds_permit);
            q.jobs.len() == 1
        };
        if first {
            let take = Take { queue: self.queue.clone(), ran: false };
            // An arbiter that is gone runs nothing: `Take` lets go of the
            // jobs when it is dropped unrun, here or there.
            let _ = self.arbiter.spawn_fn(move || take.run());
        }
    }
}

/// Takes a lane's queued jobs on its arbiter and runs them; dropped without
/// running (the arbiter stopped), drops them, so that their runs report
/// themselves lost. Either way their permits go back.
struct Take {
    queue: Arc<LaneQueue>,
    ran: bool,
}

impl Take {
    fn take(&self) -> Vec<Job> {
        let Queued { jobs, held } = std::mem::take(&mut *self.queue.lock());
        self.queue.room.add_permits(held);
        jobs
    }

    fn run(mut self) {
        self.ran = true;
        for job in self.take() {
            job();
        }
    }
}

impl Drop for Take {
    fn drop(&mut self) {
        if !self.ran {
            drop(self.take());
        }
    }
}

/// Room for one actor on a lane of the engine, reserved with
/// [`Engine::reserve`]; given back if it is dropped unused.
pub(crate) struct Reserved {
    engine: Engine,
    /// The lane whose permit this holds; none on an arbiter's thread.
    lane: Option<usize>,
}

impl Reserved {
    /// Starts the actor in the room reserved: right here on an arbiter's
    /// thread, else queued on the lane.
    pub(crate) fn spawn<A, F>(mut self, make: F)
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        match self.lane.take() {
            Some(i) => {
                self.engine.inner.arbiters[i].push(Box::new(move || drop(A::create(make))), true)
            }
            None => self.engine.spawn(make),
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(i) = self.lane {
            self.engine.inner.arbiters[i].queue.room.add_permits(1);
        }
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("threads", &self.inner.arbiters.len()).finish()
    }
}

/// The engine's threads could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the engine's threads: {0}")]
pub struct EngineError(String);

impl Engine {
    /// The process-wide engine: one arbiter per available core, started at first use.
    pub fn shared() -> Result<Engine, EngineError> {
        static SHARED: OnceLock<Result<Engine, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                Engine::start(n).map_err(|e| e.0)
            })
            .clone()
            .map_err(EngineError)
    }

    /// An engine of its own with `threads` arbiters, stopped when the last clone is dropped.
    pub fn start(threads: usize) -> Result<Engine, EngineError> {
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("orchestrix-engine".into())
            .spawn(move || {
                let system = System::new();
                let arbiters: Vec<Arbiter> =
                    system.block_on(async { (0..threads).map(|_| Arbiter::new()).collect() });
                let handles = arbiters.iter().map(Arbiter::handle).collect::<Vec<_>>();
                let _ = tx.send((System::current(), handles));
                let _ = system.run();
            })
            .map_err(|e| EngineError(e.to_string()))?;
        let (system, handles) = rx.recv().map_err(|e| EngineError(e.to_string()))?;
        let arbiters =
            handles.into_iter().map(|arbiter| Lane { arbiter, queue: Arc::default() }).collect();
        Ok(Engine {
            inner: Arc::new(Inner { arbiters, next: AtomicUsize::new(0), system: Some(system) }),
        })
    }

    /// Number of arbiter threads.
    pub fn threads(&self) -> usize {
        self.inner.arbiters.len()
    }

    /// Starts an actor: on the calling arbiter if there is one, else queued
    /// on the next arbiter of this engine in turn, at once (see
    /// [`Engine::reserve`] for starts that wait for room).
    pub(crate) fn spawn<A, F>(&self, make: F)
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        if let Some(here) = Arbiter::try_current() {
            // Through the arbiter's own queue rather than created right here:
            // the caller may be a tokio task on the arbiter's thread but
            // outside its actor context (the tasks of a node started on an
            // actix system), where creating an actor panics. An arbiter that
            // is stopping drops the start: its run reports itself lost.
            let _ = here.spawn_fn(move || drop(A::create(make)));
            return;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        self.inner.arbiters[i].push(Box::new(move || drop(A::create(make))), false);
    }

    /// Reserves room for a new run's actor on the next arbiter in turn,
    /// waiting while [`LANE_BACKLOG`] starts are queued there: concurrent
    /// starters and a caller starting runs in a loop are paced alike.
    /// Reserved before the run is created, so that a caller that gives up
    /// while it waits leaves nothing behind. On an arbiter's thread (a step
    /// starting a run), nothing waits: the actor is created right there.
    pub(crate) async fn reserve(&self) -> Reserved {
        if Arbiter::try_current().is_some() {
            return Reserved { engine: self.clone(), lane: None };
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        let lane = match self.inner.arbiters[i].queue.room.acquire().await {
            Ok(permit) => {
                permit.forget();
                Some(i)
            }
            // Never closed; were it, the start would go unpaced.
            Err(_) => None,
        };
        Reserved { engine: self.clone(), lane }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for lane in &self.arbiters {
            lane.arbiter.stop();
        }
        if let Some(s) = &self.system {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    struct Nothing;

    impl Actor for Nothing {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            use actix::ActorContext;
            ctx.stop();
        }
    }

    /// Counts the starts that were dropped unrun.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Keeps the engine's one arbiter busy until the sender is dropped or sent to.
    fn busy(engine: &Engine) -> std::sync::mpsc::Sender<()> {
        let (release, busy) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        engine.inner.arbiters[0].arbiter.spawn_fn(move || {
            let _ = entered_tx.send(());
            let _ = busy.recv();
        });
        entered.recv().unwrap();
        release
    }

    fn queued(engine: &Engine) -> usize {
        engine.inner.arbiters[0].queue.lock().jobs.len()
    }

    /// Fills the lane of a busy engine; returns the next start, shown to wait.
    async fn filled(engine: &Engine) -> std::pin::Pin<Box<impl Future<Output = Reserved> + '_>> {
        for _ in 0..LANE_BACKLOG {
            engine.reserve().await.spawn(|_| Nothing);
        }
        let mut next = Box::pin(engine.reserve());
        assert!(tokio::time::timeout(Duration::from_millis(200), next.as_mut()).await.is_err());
        assert_eq!(queued(engine), LANE_BACKLOG);
        next
    }

    #[tokio::test]
    async fn a_flood_of_starts_waits_for_a_busy_arbiter() {
        let engine = Engine::start(1).unwrap();
        let release = busy(&engine);
        // The next start waits for the arbiter to take the ones queued.
        let next = filled(&engine).await;
        release.send(()).unwrap();
        let room = tokio::time::timeout(Duration::from_secs(10), next).await.expect("room");
        room.spawn(|_| Nothing);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_starters_are_held_back_too_and_none_is_lost_or_doubled() {
        let engine = Engine::start(1).unwrap();
        let release = busy(&engine);
        let ran = Arc::new(AtomicUsize::new(0));
        let starters: Vec<_> = (0..2_000)
            .map(|_| {
                let (engine, ran) = (engine.clone(), ran.clone());
                tokio::spawn(async move {
                    engine.reserve().await.spawn(move |_| {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Nothing
                    });
                })
            })
            .collect();
        // Every starter has had its chance to queue: no more than the backlog did.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while queued(&engine) < LANE_BACKLOG && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(queued(&engine), LANE_BACKLOG);
        release.send(()).unwrap();
        for s in starters {
            tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .expect("no starter hangs")
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ran.load(Ordering::SeqCst) < 2_000 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2_000);
    }

    #[tokio::test]
    async fn a_start_given_up_while_it_waits_gives_its_room_back() {
        let engine = Engine::start(1).unwrap();
        let release = busy(&engine);
        let rooms: Vec<Reserved> =
            futures::future::join_all((0..LANE_BACKLOG).map(|_| engine.reserve())).await;
        // Full: a start gives up waiting, another one gives its room back unused.
        assert!(tokio::time::timeout(Duration::from_millis(100), engine.reserve()).await.is_err());
        drop(rooms);
        let room =
            tokio::time::timeout(Duration::from_secs(10), engine.reserve()).await.expect("room");
        room.spawn(|_| Nothing);
        drop(release);
    }

    #[tokio::test]
    async fn starts_on_a_stopped_engine_are_dropped_not_waited_for() {
        let engine = Engine::start(1).unwrap();
        assert!(engine.inner.arbiters[0].arbiter.stop());
        let dropped = Arc::new(AtomicUsize::new(0));
        let n = 3 * LANE_BACKLOG;
        let all = async {
            for _ in 0..n {
                let c = Counted(dropped.clone());
                engine.reserve().await.spawn(move |_| {
                    drop(c);
                    Nothing
                });
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all).await.expect("nobody waits");
        // Each start was dropped (its run reports itself lost), or ran if
        // the arbiter was still there for it: none is left queued.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dropped.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dropped.load(Ordering::SeqCst), n);
        assert_eq!(queued(&engine), 0);
    }

    #[tokio::test]
    async fn a_waiter_is_let_go_when_the_busy_arbiter_stops() {
        let engine = Engine::start(1).unwrap();
        let release = busy(&engine);
        let next = filled(&engine).await;
        assert!(engine.inner.arbiters[0].arbiter.stop());
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), next).await.expect("let go");
        assert_eq!(queued(&engine), 0);
    }
}
