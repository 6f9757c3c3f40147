//! Errors of the shared crate.

/// Input that failed validation; the message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidInput {
    pub message: String,
}

impl InvalidInput {
    pub fn new(message: impl Into<String>) -> Self {
        InvalidInput {
            message: message.into(),
        }
    }
}
