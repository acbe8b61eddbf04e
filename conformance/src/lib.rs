//! The Orchestrix conformance kit.
//!
//! [`kit::run`] starts a real `nats-server` (JetStream, temp dir, free
//! loopback port), `orchestrix serve` coordinators and the worker under
//! test (any language: a shell command), runs the conformance scenarios
//! against the conformance flow ([`flow`]) and returns one
//! [`kit::ScenarioResult`] per scenario. Every child process is killed when
//! the kit returns, fails or panics. See `conformance/README.md` for the
//! contract a worker implements.

pub mod effects;
pub mod flow;
pub mod kit;
pub mod procs;
mod scenarios;

/// Why the kit could not run its scenarios at all (a scenario's own failure
/// is a [`kit::ScenarioResult`], not an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was started.
        what: String,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// A process started but never became ready.
    #[error("{what} did not become ready: {detail}")]
    NotReady {
        /// The process.
        what: String,
        /// What was seen.
        detail: String,
    },
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// NATS could not be reached or used.
    #[error("NATS: {0}")]
    Nats(String),
    /// The kit was asked for something it cannot do.
    #[error("{0}")]
    Config(String),
}
