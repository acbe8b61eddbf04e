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

#[derive(Default)]
struct LaneQueue {
    jobs: Mutex<Vec<Job>>,
    /// Told each time the arbiter took the queued jobs.
    taken: tokio::sync::Notify,
}

impl LaneQueue {
    fn len(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Starts queued on one arbiter past which a caller of [`Engine::spawn`]
/// waits for the arbiter to take them. A flood of starts would otherwise
/// queue without bound, and what all those runs hold at once before their
/// first step (the queue, and then every run's first transition and command
/// in flight together) stays resident long after.
const LANE_BACKLOG: usize = 256;

impl Lane {
    /// Queues a job; returns how many are queued now.
    fn push(&self, job: Job) -> usize {
        let len = {
            let mut q = self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
            q.push(job);
            q.len()
        };
        if len == 1 {
            let take = Take { queue: self.queue.clone(), ran: false };
            // An arbiter that is gone runs nothing: `Take` lets go of the
            // jobs when it is dropped unrun, here or there.
            let _ = self.arbiter.spawn_fn(move || take.run());
        }
        len
    }
}

/// Takes a lane's queued jobs on its arbiter and runs them; dropped without
/// running (the arbiter stopped), drops them, so that their runs report
/// themselves lost and nobody waits for the arbiter to take them.
struct Take {
    queue: Arc<LaneQueue>,
    ran: bool,
}

impl Take {
    fn take(&self) -> Vec<Job> {
        let jobs = std::mem::take(&mut *self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner()));
        self.queue.taken.notify_waiters();
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

    /// Starts an actor: on the calling arbiter if there is one, else on the
    /// next arbiter of this engine in turn. When that arbiter already has
    /// [`LANE_BACKLOG`] starts queued, waits until it takes them, so that a
    /// caller starting runs in a loop is paced by the engine.
    pub(crate) async fn spawn<A, F>(&self, make: F)
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        let Some((lane, queued)) = self.queue(make) else { return };
        if queued < LANE_BACKLOG {
            return;
        }
        let taken = lane.taken.notified();
        tokio::pin!(taken);
        taken.as_mut().enable();
        // Taken in between: the notice went before this waiter was there.
        if lane.len() >= LANE_BACKLOG {
            taken.await;
        }
    }

    /// Creates the actor here, on an arbiter's thread, or queues it on a
    /// lane of this engine: then it returns the lane and how many starts it
    /// holds now.
    fn queue<A, F>(&self, make: F) -> Option<(&LaneQueue, usize)>
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        if Arbiter::try_current().is_some() {
            A::create(make);
            return None;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        let lane = &self.inner.arbiters[i];
        let queued = lane.push(Box::new(move || {
            A::create(make);
        }));
        Some((&lane.queue, queued))
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

    #[tokio::test]
    async fn a_flood_of_starts_waits_for_a_busy_arbiter() {
        let engine = Engine::start(1).unwrap();
        let lane = &engine.inner.arbiters[0];
        // The arbiter is busy until told otherwise.
        let (release, busy) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        lane.arbiter.spawn_fn(move || {
            let _ = entered_tx.send(());
            let _ = busy.recv();
        });
        entered.recv().unwrap();
        for _ in 1..LANE_BACKLOG {
            engine.spawn(|_| Nothing).await;
        }
        // The start that fills the lane waits for the arbiter to take it.
        let full = engine.spawn(|_| Nothing);
        tokio::pin!(full);
        assert!(tokio::time::timeout(Duration::from_millis(200), full.as_mut()).await.is_err());
        assert_eq!(lane.queue.len(), LANE_BACKLOG);
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), full).await.expect("let through");
        // Under the backlog, nobody waits.
        tokio::time::timeout(Duration::from_secs(10), engine.spawn(|_| Nothing))
            .await
            .expect("no wait");
    }

    #[tokio::test]
    async fn starts_on_a_stopped_engine_are_dropped_not_waited_for() {
        let engine = Engine::start(1).unwrap();
        let lane = &engine.inner.arbiters[0];
        assert!(lane.arbiter.stop());
        let dropped = Arc::new(AtomicUsize::new(0));
        let n = 3 * LANE_BACKLOG;
        let all = async {
            for _ in 0..n {
                let c = Counted(dropped.clone());
                engine
                    .spawn(move |_| {
                        drop(c);
                        Nothing
                    })
                    .await;
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
        assert_eq!(lane.queue.len(), 0);
    }
}
