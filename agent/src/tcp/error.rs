//! Why the TCP data plane could not start or stopped: each error names the
//! step that failed (`loading the sk_lookup program: ...`).

use std::error::Error as StdError;

/// A failed step of the TCP data plane and its cause. It shows the step
/// and the cause's whole chain (`loading the sk_lookup program: ...:
/// Operation not permitted`) and has no source of its own, so that a
/// caller printing the chain does not print it twice.
#[derive(Debug)]
pub struct TcpError {
    step: String,
    cause: Box<dyn StdError + Send + Sync>,
}

impl std::fmt::Display for TcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.cause)?;
        let mut next = self.cause.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

impl StdError for TcpError {}

pub type Result<T, E = TcpError> = std::result::Result<T, E>;

impl TcpError {
    /// `step` failed because of `cause`.
    pub fn new(step: impl Into<String>, cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            step: step.into(),
            cause: cause.into(),
        }
    }
}

/// Names the step a fallible call was.
pub(crate) trait Step<T> {
    fn step(self, step: impl Into<String>) -> Result<T>;
}

impl<T, E: StdError + Send + Sync + 'static> Step<T> for std::result::Result<T, E> {
    fn step(self, step: impl Into<String>) -> Result<T> {
        self.map_err(|e| TcpError::new(step, e))
    }
}

impl<T> Step<T> for Option<T> {
    fn step(self, step: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| TcpError::new(step, "not found"))
    }
}
