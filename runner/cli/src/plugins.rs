//! Plugin descriptions for the coordinator. The coordinator never loads a plugin library (it
//! would pull in libtorch); it asks `xlab-worker plugins` and reads the JSON it prints.

use std::path::{Path, PathBuf};
use xlab_proto::plugins::{CheckFailure, JobCheck, Registry};

/// A registry fetched from the worker on first use, then kept.
pub struct WorkerPlugins {
    worker: PathBuf,
    cached: Option<Registry>,
}

impl WorkerPlugins {
    pub fn new(worker: PathBuf) -> Self {
        Self { worker, cached: None }
    }

    pub fn fetch(worker: &Path, extra: &[PathBuf]) -> Result<Registry, String> {
        let mut cmd = std::process::Command::new(worker);
        cmd.arg("plugins");
        for p in extra {
            cmd.arg(if p.is_dir() { "--dir" } else { "--file" }).arg(p);
        }
        let out = cmd.output().map_err(|e| format!("cannot start the worker {}: {e}", worker.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`{} plugins` failed: {}",
                worker.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("the worker's plugin list is not valid JSON: {e}"))
    }
}

impl xlab_plan::PluginSource for WorkerPlugins {
    fn registry(&mut self, extra: &[PathBuf]) -> Result<&Registry, String> {
        if self.cached.is_none() {
            self.cached = Some(Self::fetch(&self.worker, extra)?);
        }
        Ok(self.cached.as_ref().expect("just fetched"))
    }

    fn check_jobs(&mut self, jobs: &[JobCheck]) -> Result<Vec<CheckFailure>, String> {
        use std::io::Write;
        let mut child = std::process::Command::new(&self.worker)
            .arg("check")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the worker {}: {e}", self.worker.display()))?;
        let request = serde_json::to_vec(jobs).expect("checks serialize");
        let mut stdin = child.stdin.take().expect("piped");
        // Written from a thread: the worker may answer (and fill its stdout) before reading all.
        let writer = std::thread::spawn(move || stdin.write_all(&request));
        let out = child.wait_with_output().map_err(|e| format!("the worker's check did not finish: {e}"))?;
        let _ = writer.join();
        if !out.status.success() {
            return Err(format!(
                "`{} check` failed ({}): {}",
                self.worker.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("the worker's check is not valid JSON: {e}"))
    }
}
