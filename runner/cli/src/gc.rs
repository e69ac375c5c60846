//! `xlab gc`: removes checkpoints no job needs. A done job has its final weights, so its
//! checkpoints go (or all but the newest, with `--keep-last`); an unfinished job keeps its
//! newest valid checkpoint, the one a resume starts from, and loses the older ones. Temporary
//! files a killed writer left behind go too. It runs under the store's lock, so never beside a
//! run that could be writing a checkpoint.

use std::path::{Path, PathBuf};
use xlab_proto::artifacts::{check_tensor_file, checkpoint_points, CheckpointPoint};
use xlab_store::{JobRecord, JobStatus, ResultStore};

#[derive(Debug, Default)]
pub struct Report {
    /// Files removed (or that would be, in a dry run) and their bytes.
    pub files: Vec<(PathBuf, u64)>,
    /// Jobs whose checkpoints were touched.
    pub jobs: usize,
    /// Unfinished jobs whose newest checkpoint was kept for their resume.
    pub kept_for_resume: usize,
    /// Jobs left alone because a worker in Slurm may still be writing their folders.
    pub in_slurm: usize,
}

impl Report {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }
}

/// Whether a checkpoint's tensor file has the size and SHA-256 its JSON records.
fn valid(run_dir: &Path, point: CheckpointPoint) -> bool {
    let json = run_dir.join(format!("{}.json", point.stem()));
    let Ok(meta) = std::fs::read(&json).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) else {
        return false;
    };
    let Ok(meta) = meta else { return false };
    let (Some(file), Some(size), Some(sha)) =
        (meta["tensors_file"].as_str(), meta["tensors_bytes"].as_u64(), meta["tensors_sha256"].as_str())
    else {
        return false;
    };
    check_tensor_file(run_dir, file, size, sha).is_ok()
}

/// The files of a checkpoint that exist, with their sizes.
fn checkpoint_files(run_dir: &Path, point: CheckpointPoint) -> Vec<(PathBuf, u64)> {
    ["json", "safetensors"]
        .iter()
        .map(|ext| run_dir.join(format!("{}.{ext}", point.stem())))
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len())))
        .collect()
}

/// Temporary files of interrupted writes (`*.tmp`) in a run folder.
fn leftovers(run_dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(run_dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()).map(|m| (e.path(), m.len())))
        .collect()
}

/// What to remove from one job's run folder.
fn plan_job(store: &dyn ResultStore, job: &JobRecord, keep_last: bool) -> (Vec<(PathBuf, u64)>, bool) {
    let dir = store.run_dir(&job.id);
    let mut remove = leftovers(&dir);
    let points = checkpoint_points(&dir);
    let keep = match job.status {
        JobStatus::Done if keep_last => points.iter().copied().find(|&p| valid(&dir, p)),
        JobStatus::Done => None,
        // A resume starts from the newest valid checkpoint; an invalid newer one is garbage.
        _ => points.iter().copied().find(|&p| valid(&dir, p)),
    };
    for p in points {
        if Some(p) != keep {
            remove.extend(checkpoint_files(&dir, p));
        }
    }
    (remove, keep.is_some() && job.status != JobStatus::Done)
}

/// Removes (or, with `dry_run`, lists) what no job needs, for the jobs of `experiment` or all.
pub fn collect(
    store: &dyn ResultStore,
    experiment: Option<&str>,
    keep_last: bool,
    dry_run: bool,
) -> Result<Report, xlab_store::StoreError> {
    let mut report = Report::default();
    for mut job in store.jobs()? {
        if experiment.is_some_and(|e| e != job.experiment) {
            continue;
        }
        // A stopped `xlab run --executor slurm` leaves its jobs running in Slurm: their workers
        // write checkpoints (and temporary files) without the store's lock.
        if job.in_slurm().is_some() {
            report.in_slurm += 1;
            continue;
        }
        let (remove, kept_for_resume) = plan_job(store, &job, keep_last);
        report.kept_for_resume += usize::from(kept_for_resume);
        if remove.is_empty() {
            continue;
        }
        report.jobs += 1;
        if !dry_run {
            for (p, _) in &remove {
                if let Err(e) = std::fs::remove_file(p) {
                    tracing::warn!("cannot remove {}: {e}", p.display());
                }
            }
            // The record lists the checkpoint it points at only while the file is there.
            let before = job.artifacts.len();
            let dir = store.dir().to_path_buf();
            job.artifacts.retain(|a| a.name != "checkpoint" || dir.join(&a.path).exists());
            if job.artifacts.len() != before {
                store.put_job(&job)?;
            }
        }
        report.files.extend(remove);
    }
    if !dry_run {
        store.flush()?;
    }
    Ok(report)
}
