use std::fmt;

use orchestrix_proto::StepFailure;

/// Why a step attempt failed, and whether trying again may help.
///
/// Any `std::error::Error` converts into a *retryable* `StepError`, so `?` works
/// in handlers. Mark an error permanent (with [`StepError::permanent`],
/// [`StepError::into_permanent`] or [`ResultExt::permanent`]) when retrying cannot
/// help, e.g. a declined card: the remaining retries are skipped and the
/// rollback starts at once.
///
/// `StepError` deliberately does not implement `std::error::Error`, so that the
/// blanket conversion from every error type can exist.
#[derive(Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
    /// The handler ran, so its effect may have happened (its output could
    /// not be encoded, say): the outcome is unknown, not a plain failure.
    maybe_done: bool,
}

impl StepError {
    /// An error that the step's retry policy may retry.
    pub fn retryable(message: impl fmt::Display) -> Self {
        StepError { message: message.to_string(), retryable: true, maybe_done: false }
    }

    /// An error that no retry can fix: the step fails at once.
    pub fn permanent(message: impl fmt::Display) -> Self {
        StepError { message: message.to_string(), retryable: false, maybe_done: false }
    }

    /// A permanent error after which the handler's effect may have
    /// happened all the same (its output could not be encoded).
    pub(crate) fn after_effect(message: impl fmt::Display) -> Self {
        StepError { message: message.to_string(), retryable: false, maybe_done: true }
    }

    /// This error, made permanent.
    #[must_use]
    pub fn into_permanent(mut self) -> Self {
        self.retryable = false;
        self
    }

    /// False for permanent errors.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The error message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The wire form of this error.
    pub fn into_failure(self) -> StepFailure {
        StepFailure {
            message: self.message,
            retryable: self.retryable,
            maybe_done: self.maybe_done,
        }
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "permanent" };
        write!(f, "StepError({kind}: {:?})", self.message)
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(err: E) -> Self {
        // Keep the causes: "cannot reach db: connection refused" reads better
        // in a report than the outermost message alone.
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        StepError { message, retryable: true, maybe_done: false }
    }
}

/// Marks the error of a `Result` as retryable or permanent.
///
/// ```
/// use orchestrix_worker::{ResultExt, StepError};
/// fn parse(s: &str) -> Result<u32, StepError> {
///     s.parse::<u32>().permanent()
/// }
/// assert!(!parse("x").unwrap_err().is_retryable());
/// ```
pub trait ResultExt<T> {
    /// Any error becomes a permanent [`StepError`].
    fn permanent(self) -> Result<T, StepError>;
    /// Any error becomes a retryable [`StepError`].
    fn retryable(self) -> Result<T, StepError>;
}

impl<T, E: Into<StepError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, StepError> {
        self.map_err(|e| e.into().into_permanent())
    }

    fn retryable(self) -> Result<T, StepError> {
        self.map_err(|e| {
            let mut e = e.into();
            e.retryable = true;
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach db")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn std_errors_convert_as_retryable_with_their_causes() {
        let e: StepError = Outer(std::io::Error::other("connection refused")).into();
        assert!(e.is_retryable());
        assert_eq!(e.message(), "cannot reach db: connection refused");
        assert!(!e.clone().into_permanent().is_retryable());
    }

    #[test]
    fn result_ext_sets_the_kind() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("x"));
        assert!(!r.permanent().unwrap_err().is_retryable());
        let r: Result<(), StepError> = Err(StepError::permanent("x"));
        assert!(r.retryable().unwrap_err().is_retryable());
    }
}
