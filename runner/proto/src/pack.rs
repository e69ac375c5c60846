//! Several jobs in one Slurm allocation (`executor: {slurm: {pack: N}}`): `xlab-worker pack`
//! runs them and leaves, beside each job's event file, a note of how its worker ended; the
//! coordinator leaves a request to kill one (its `timeout:` ran out) the same way.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How one packed job's worker ended, written by the supervisor once it has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackExit {
    /// `exited with status 0`, `was killed by signal SIGKILL`.
    pub how: String,
    /// Whether the allocation was being stopped (Slurm signalled it) when the worker ended:
    /// then why comes from Slurm's state for the allocation, once it has one.
    pub stopping: bool,
}

/// `events-3.jsonl` → `events-3.exit`: where the supervisor notes how the worker ended.
pub fn exit_note(events: &Path) -> PathBuf {
    events.with_extension("exit")
}

/// `events-3.jsonl` → `events-3.kill`: the coordinator asks the supervisor to kill the worker.
pub fn kill_request(events: &Path) -> PathBuf {
    events.with_extension("kill")
}

impl PackExit {
    /// The note of a worker that has ended, if the supervisor has written it.
    pub fn read(events: &Path) -> Option<PackExit> {
        serde_json::from_slice(&std::fs::read(exit_note(events)).ok()?).ok()
    }

    /// Writes the note whole (a reader never sees half of it).
    pub fn write(&self, events: &Path) -> std::io::Result<()> {
        let path = exit_note(events);
        let tmp = path.with_extension("exit.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).expect("a note serializes"))?;
        std::fs::rename(tmp, path)
    }
}
