//! How a job fails: [`Failure`], a message with its classified cause (what the coordinator
//! retries, reports and counts), and libtorch's words for running out of memory.

use xlab_proto::FailureCause;

/// A job failure with its classified cause.
#[derive(Debug)]
pub struct Failure {
    pub cause: FailureCause,
    pub message: String,
}

impl Failure {
    pub fn new(cause: FailureCause, message: impl Into<String>) -> Self {
        Self { cause, message: message.into() }
    }
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        let message = e.to_string();
        let cause = if is_out_of_memory(&message) { FailureCause::OutOfMemory } else { FailureCause::Error };
        // libtorch appends a C++ backtrace; the first line says what happened.
        Self { cause, message: message.lines().next().unwrap_or_default().to_string() }
    }
}

/// libtorch's words for a failed allocation: "CUDA out of memory", and on the CPU
/// "DefaultCPUAllocator: can't allocate memory" or "not enough memory".
pub fn is_out_of_memory(message: &str) -> bool {
    ["out of memory", "not enough memory", "can't allocate memory"].iter().any(|m| message.contains(m))
}
