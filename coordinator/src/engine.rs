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
    queue: Arc<Mutex<Vec<Job>>>,
}

impl Lane {
    fn push(&self, job: Job) {
        let first = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.push(job);
            q.len() == 1
        };
        if first {
            let queue = self.queue.clone();
            self.arbiter.spawn_fn(move || {
                let jobs = std::mem::take(&mut *queue.lock().unwrap_or_else(|p| p.into_inner()));
                for job in jobs {
                    job();
                }
            });
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
        let arbiters = handles
            .into_iter()
            .map(|arbiter| Lane { arbiter, queue: Arc::new(Mutex::new(Vec::new())) })
            .collect();
        Ok(Engine {
            inner: Arc::new(Inner { arbiters, next: AtomicUsize::new(0), system: Some(system) }),
        })
    }

    /// Number of arbiter threads.
    pub fn threads(&self) -> usize {
        self.inner.arbiters.len()
    }

    /// Starts an actor: on the calling arbiter if there is one, else on the
    /// next arbiter of this engine in turn.
    pub(crate) fn spawn<A, F>(&self, make: F)
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        if Arbiter::try_current().is_some() {
            A::create(make);
            return;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        self.inner.arbiters[i].push(Box::new(move || {
            A::create(make);
        }));
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
