//! Room on the disk that holds the store.
//!
//! A run writes two things there: the store's database (sled, which grows a log segment of 8 MiB
//! at a time) and each job's checkpoints in its run folder. The scheduler starts a job only
//! while the disk has room for both: [`RESERVE`] for the database, and for every running job
//! (the new one included) the largest checkpoint seen in this run. On a full disk it starts no
//! more jobs, lets running ones end, and says what is full and how much it needs.

use std::path::{Path, PathBuf};

/// Room kept for the store's database: two of sled's 8 MiB log segments and a margin.
pub const RESERVE: u64 = 32 << 20;

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs buffer this function owns.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Whether an I/O error says the disk (or the user's quota) is full.
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

/// Whether an error's text is the operating system's word for a full disk (errors that cross
/// a process boundary as text: a worker's report, sled's).
pub fn says_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("Disk quota exceeded")
}

/// `12.5 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// What the scheduler knows of the store's disk.
pub struct Room {
    dir: PathBuf,
    /// The largest checkpoint (tensors and description) a job of this run wrote.
    largest_checkpoint: u64,
}

impl Room {
    pub fn new(dir: &Path) -> Room {
        Room { dir: dir.to_path_buf(), largest_checkpoint: 0 }
    }

    /// A job wrote a checkpoint whose description is at `json` (its tensors beside it).
    pub fn saw_checkpoint(&mut self, json: &Path) {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let total = size(json) + size(&json.with_extension("safetensors"));
        self.largest_checkpoint = self.largest_checkpoint.max(total);
    }

    /// What starting one more job next to `running` needs.
    pub fn need(&self, running: usize) -> u64 {
        RESERVE + self.largest_checkpoint * (running as u64 + 1)
    }

    /// Why another job cannot start now, if the disk lacks room for it.
    pub fn short(&self, running: usize) -> Option<String> {
        let free = free_bytes(&self.dir)?;
        let need = self.need(running);
        (free < need).then(|| self.describe(free, running))
    }

    /// `the disk holding the store results/ is full: 3.1 MiB free, …`.
    pub fn describe(&self, free: u64, running: usize) -> String {
        let per_job = match self.largest_checkpoint {
            0 => String::new(),
            c => format!(" and {} for the checkpoints of each of {} job(s)", human(c), running + 1),
        };
        format!(
            "the disk holding the store {} is full: {} free, and xlab needs {} to go on ({} for the store's \
             database{per_job}); free some space there (`xlab gc` removes checkpoints no job needs)",
            self.dir.display(),
            human(free),
            human(self.need(running)),
            human(RESERVE),
        )
    }

    /// [`Self::describe`] with the disk's free space now.
    pub fn describe_now(&self, running: usize) -> String {
        self.describe(free_bytes(&self.dir).unwrap_or(0), running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_grows_with_checkpoints_and_running_jobs() {
        let d = tempfile::tempdir().unwrap();
        let mut room = Room::new(d.path());
        assert_eq!(room.need(3), RESERVE);
        std::fs::write(d.path().join("ckpt-000001.json"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.path().join("ckpt-000001.safetensors"), vec![0u8; 9000]).unwrap();
        room.saw_checkpoint(&d.path().join("ckpt-000001.json"));
        assert_eq!(room.need(0), RESERVE + 10_000);
        assert_eq!(room.need(2), RESERVE + 30_000);
        assert!(free_bytes(d.path()).unwrap() > 0);
        let text = room.describe(3 << 20, 1);
        assert!(
            text.contains("3.0 MiB free") && text.contains("needs 32.0 MiB") && text.contains("2 job(s)"),
            "{text}"
        );
        assert!(is_full(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_full(&std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
}
