//! A worker's progress, where its coordinator can read it after the worker died.
//!
//! The worker maps `progress` in the job's run folder and keeps in it the training step it is in
//! and the plugin call it is inside, as plain stores into memory (no system call per step). The
//! file outlives the process whatever kills it, so the coordinator can say where a crash
//! happened (`signal 11 at step 3, inside `fixture.crashes` step`) and recognise a crash that
//! repeats at the same place on every attempt.
//!
//! Layout ([`SIZE`] bytes, little-endian): magic `XLABPRG1`; the step + 1 (0 before the first
//! step) as u64 at [`STEP`]; the epoch (0-based) as u64 at [`EPOCH`]; the length of the call's
//! label as u16 at [`CALL_LEN`], then the label's UTF-8 bytes (at most [`CALL_MAX`]) at
//! [`CALL`]; an empty label when no plugin call is in progress.

use std::path::Path;

pub const FILE: &str = "progress";
pub const MAGIC: &[u8; 8] = b"XLABPRG1";
pub const STEP: usize = 8;
pub const EPOCH: usize = 16;
pub const CALL_LEN: usize = 24;
pub const CALL: usize = 26;
pub const CALL_MAX: usize = 200;
pub const SIZE: usize = CALL + CALL_MAX;

/// Where a worker was when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The global training step (0-based) it was in, if it had started one.
    pub step: Option<u64>,
    pub epoch: u64,
    /// The plugin call it was inside, e.g. "`fixture.crashes` step".
    pub call: Option<String>,
}

impl Progress {
    /// Decodes the file's bytes; `None` for anything that is not a progress record.
    pub fn decode(b: &[u8]) -> Option<Progress> {
        if b.len() < SIZE || &b[..8] != MAGIC {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let len = (u16::from_le_bytes([b[CALL_LEN], b[CALL_LEN + 1]]) as usize).min(CALL_MAX);
        let call = String::from_utf8_lossy(&b[CALL..CALL + len]).into_owned();
        Some(Progress {
            step: u64_at(STEP).checked_sub(1),
            epoch: u64_at(EPOCH),
            call: (!call.is_empty()).then_some(call),
        })
    }

    /// Reads the progress a worker left in `run_dir`.
    pub fn read(run_dir: &Path) -> Option<Progress> {
        Progress::decode(&std::fs::read(run_dir.join(FILE)).ok()?)
    }

    /// `at step 3 (epoch 1), inside `sam.sam` step`, for messages.
    pub fn describe(&self) -> String {
        let at = match self.step {
            Some(s) => format!("at step {s} (epoch {})", self.epoch + 1),
            None => "before its first training step".to_string(),
        };
        match &self.call {
            Some(c) => format!("{at}, inside {c}"),
            None => at,
        }
    }
}

/// The label's bytes as the file keeps them: at most [`CALL_MAX`], cut at a character boundary.
pub fn call_bytes(label: &str) -> &[u8] {
    let mut end = label.len().min(CALL_MAX);
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    &label.as_bytes()[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_and_describes_where_the_worker_was() {
        let mut b = vec![0u8; SIZE];
        b[..8].copy_from_slice(MAGIC);
        assert_eq!(Progress::decode(&b).unwrap().describe(), "before its first training step");
        b[STEP..STEP + 8].copy_from_slice(&4u64.to_le_bytes());
        b[EPOCH..EPOCH + 8].copy_from_slice(&1u64.to_le_bytes());
        let label = call_bytes("`fixture.crashes` step");
        b[CALL_LEN..CALL_LEN + 2].copy_from_slice(&(label.len() as u16).to_le_bytes());
        b[CALL..CALL + label.len()].copy_from_slice(label);
        let p = Progress::decode(&b).unwrap();
        assert_eq!((p.step, p.epoch), (Some(3), 1));
        assert_eq!(p.describe(), "at step 3 (epoch 2), inside `fixture.crashes` step");
        assert!(Progress::decode(&b[..SIZE - 1]).is_none());
        assert_eq!(call_bytes(&"λ".repeat(150)).len(), 200);
    }
}
