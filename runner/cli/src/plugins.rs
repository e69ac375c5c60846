//! Plugin descriptions for the coordinator. The coordinator never loads a plugin library (it
//! would pull in libtorch); it asks `xlab-worker plugins` and reads the JSON it prints.

use std::path::{Path, PathBuf};
use xlab_proto::plugins::Registry;

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

impl xlab_spec::PluginSource for WorkerPlugins {
    fn registry(&mut self, extra: &[PathBuf]) -> Result<&Registry, String> {
        if self.cached.is_none() {
            self.cached = Some(Self::fetch(&self.worker, extra)?);
        }
        Ok(self.cached.as_ref().expect("just fetched"))
    }
}
