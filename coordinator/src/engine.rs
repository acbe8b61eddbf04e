//! The threads that run actors.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use actix::{Actor, Addr, Context};
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
    arbiters: Vec<ArbiterHandle>,
    next: AtomicUsize,
    system: Option<System>,
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
                let arbiters: Vec<Arbiter> = system.block_on(async { (0..threads).map(|_| Arbiter::new()).collect() });
                let handles = arbiters.iter().map(Arbiter::handle).collect::<Vec<_>>();
                let _ = tx.send((System::current(), handles));
                let _ = system.run();
            })
            .map_err(|e| EngineError(e.to_string()))?;
        let (system, arbiters) = rx.recv().map_err(|e| EngineError(e.to_string()))?;
        Ok(Engine { inner: Arc::new(Inner { arbiters, next: AtomicUsize::new(0), system: Some(system) }) })
    }

    /// Number of arbiter threads.
    pub fn threads(&self) -> usize {
        self.inner.arbiters.len()
    }

    /// Starts an actor: on the calling arbiter if there is one, else on the
    /// next arbiter of this engine in turn.
    pub(crate) fn spawn<A, F>(&self, make: F) -> Addr<A>
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        if let Some(here) = Arbiter::try_current() {
            return A::start_in_arbiter(&here, make);
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        A::start_in_arbiter(&self.inner.arbiters[i], make)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for a in &self.arbiters {
            a.stop();
        }
        if let Some(s) = &self.system {
            s.stop();
        }
    }
}
