//! `xlab doctor`: versions, libtorch, devices, the store, Slurm and where plugins are looked for.

use crate::common::*;
use crate::{Cli, VERSION};
use anyhow::Context;
use xlab_store::{ResultStore, Store, StoreError};

pub fn run(cli: &Cli) -> Result<u8, Failure> {
    outln!("xlab {VERSION} ({})", env!("XLAB_GIT_COMMIT"));
    let worker = worker_path();
    outln!("worker:       {}", worker.display());
    match std::process::Command::new(&worker).arg("probe").output() {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("the worker's probe did not print JSON")?;
            let s = |k: &str| {
                v.get(k).map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).unwrap_or_default()
            };
            outln!("libtorch:     {} at {}", s("libtorch_version"), s("libtorch_dir"));
            outln!("CUDA library: {}", s("cuda_library"));
            outln!(
                "CUDA usable:  {} ({} device(s), cuDNN {})",
                s("cuda_available"),
                s("cuda_devices"),
                s("cudnn_available")
            );
            outln!("CPU threads:  {} (host {})", s("cpu_threads"), s("host"));
        }
        Ok(out) => outln!("libtorch:     the worker's probe failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => outln!("libtorch:     cannot start the worker: {e} (build it with `make build`)"),
    }
    let gpus = xlab_sched::detect_gpus();
    for g in &gpus {
        outln!("GPU:          cuda:{} {} ({} MiB)", g.index, g.name, g.memory_mib);
    }
    if gpus.is_empty() {
        outln!("GPUs:         none found (neither NVML nor nvidia-smi answers); jobs run on CPU slots");
    }
    let abs = std::path::absolute(&cli.store).unwrap_or_else(|_| cli.store.clone());
    let state = match Store::open(&cli.store) {
        Ok(s) => format!("{} experiment(s)", s.experiments().map(|e| e.len()).unwrap_or(0)),
        Err(StoreError::InUse { pid, .. }) => format!("in use by pid {pid}"),
        Err(e) => format!("cannot open: {e}"),
    };
    outln!("store:        {} ({state})", abs.display());
    // `--executor slurm` needs Slurm's commands here, and a controller that answers.
    let mut answers = false;
    let slurm = match std::process::Command::new("sbatch").arg("--version").output() {
        Err(_) => "no `sbatch` on PATH (`--executor slurm` needs Slurm's commands)".into(),
        Ok(o) if !o.status.success() => {
            let said = String::from_utf8_lossy(&o.stderr);
            format!("`sbatch` is installed but fails: {}", said.lines().last().unwrap_or("").trim())
        }
        Ok(o) => match xlab_sched::slurm::queue() {
            Ok(q) => {
                answers = true;
                format!("{} ({} job(s) of yours listed)", String::from_utf8_lossy(&o.stdout).trim(), q.len())
            }
            Err(e) => format!("{}, but {}", String::from_utf8_lossy(&o.stdout).trim(), e.lines().next().unwrap_or("")),
        },
    };
    outln!("Slurm:        {slurm}");
    if answers {
        outln!("Slurm limits: {}", xlab_sched::slurm::limits(None, &[]).describe());
        outln!("store's disk: {}", filesystem(&abs));
    }
    let mut path: Vec<String> = worker.parent().map(|d| vec![d.display().to_string()]).unwrap_or_default();
    if let Some(p) = std::env::var_os("XLAB_PLUGIN_PATH") {
        path.extend(std::env::split_paths(&p).map(|d| d.display().to_string()));
    }
    outln!("plugin path:  {}", path.join(":"));
    Ok(0)
}

/// The filesystem the store's folder (or its nearest existing parent) is on, and whether Slurm's
/// nodes can be expected to see it: their workers write into the store's run folders.
fn filesystem(dir: &std::path::Path) -> String {
    let Some(existing) = dir.ancestors().find(|d| d.exists()) else { return "cannot tell".into() };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else { return "cannot tell".into() };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return format!("cannot tell ({})", std::io::Error::last_os_error());
    }
    // Magic numbers from statfs(2).
    let shared = match st.f_type as u64 {
        0x6969 => Some("NFS"),
        0x0bd0_0bd0 => Some("Lustre"),
        0x4750_4653 => Some("GPFS"),
        0x1983_0326 => Some("BeeGFS"),
        0x00c3_6400 => Some("CephFS"),
        0xff53_4d42 | 0xfe53_4d42 => Some("SMB"),
        0x6573_5546 => Some("FUSE (sshfs, a cluster filesystem's client, ...)"),
        0x5346_414f => Some("AFS"),
        _ => None,
    };
    let local = match st.f_type as u64 {
        0xef53 => "ext4",
        0x5846_5342 => "XFS",
        0x9123_683e => "Btrfs",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlayfs",
        0x2fc1_2fc1 => "ZFS",
        _ => "a local filesystem",
    };
    match shared {
        Some(name) => format!("{} is on {name}, a filesystem Slurm's nodes can share", existing.display()),
        None => format!(
            "{} is on {local}, local to this machine: Slurm jobs on other nodes cannot write their results there \
             (put the store on a shared folder, e.g. home or scratch, for `--executor slurm` beyond one node)",
            existing.display()
        ),
    }
}
