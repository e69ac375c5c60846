//! What libtorch this worker runs on, and what it can see.

use serde_json::json;
use std::path::PathBuf;

/// The folder of the libtorch shared libraries this process has loaded.
pub fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(|d| d.to_path_buf()))
}

/// The version of the loaded libtorch, e.g. `2.11.0+cu130`, read from the torch package it
/// belongs to.
pub fn libtorch_version() -> String {
    let from_package = libtorch_dir().and_then(|d| {
        let text = std::fs::read_to_string(d.parent()?.join("version.py")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
    });
    from_package.unwrap_or_else(|| "unknown".to_string())
}

/// libtorch links its CUDA half (libtorch_cuda.so) only when the linker keeps it, and
/// `--as-needed` drops it; without it CUDA looks "not available". Load it explicitly when the
/// installed libtorch has it. The library is never unloaded.
pub fn load_cuda_support() -> Result<bool, String> {
    let Some(dir) = libtorch_dir() else { return Ok(false) };
    let lib = dir.join("libtorch_cuda.so");
    if !lib.exists() {
        return Ok(false);
    }
    // SAFETY: libtorch_cuda.so is the CUDA half of the libtorch already loaded in this process;
    // its initializers register CUDA kernels and hooks and have no other preconditions.
    match unsafe { libloading::Library::new(&lib) } {
        Ok(l) => {
            std::mem::forget(l);
            Ok(true)
        }
        Err(e) => Err(format!("{}: {e}", lib.display())),
    }
}

/// The libtorch's CUDA version (from the torch package's `version.py`), and on a GPU the
/// driver's version and the GPU's name (from the driver's files under /proc), and the CPU's
/// model name.
pub fn machine(device: &str) -> xlab_proto::Machine {
    let version_py = libtorch_dir().and_then(|d| std::fs::read_to_string(d.parent()?.join("version.py")).ok());
    let cuda = version_py.as_deref().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("cuda").and_then(|r| r.split_once('=')).map(|(_, v)| v.trim()))
            .filter(|v| *v != "None")
            .map(|v| v.trim_matches(['\'', '"']).to_string())
    });
    let on_gpu = device.starts_with("cuda");
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Thu ..."
    let driver = on_gpu
        .then(|| std::fs::read_to_string("/proc/driver/nvidia/version").ok())
        .flatten()
        .and_then(|t| t.split("Kernel Module").nth(1)?.split_whitespace().next().map(String::from));
    let gpu = on_gpu.then(gpu_name).flatten();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
    });
    xlab_proto::Machine { cuda, driver, gpu, cpu }
}

/// The name of the GPU this worker sees first (`CUDA_VISIBLE_DEVICES` maps it to the lease),
/// from the driver's per-GPU files: "Model: NVIDIA H200".
fn gpu_name() -> Option<String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let first =
        visible.as_deref().and_then(|v| v.split(',').next()).and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
    let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.flatten().map(|e| e.path()).collect();
    dirs.sort();
    let info = std::fs::read_to_string(dirs.get(first)?.join("information")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
}

pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A JSON report for `xlab doctor`.
pub fn report() -> serde_json::Value {
    let cuda_lib = load_cuda_support();
    let cuda = tch::Cuda::is_available();
    json!({
        "libtorch_version": libtorch_version(),
        "libtorch_dir": libtorch_dir().map(|d| d.display().to_string()),
        "cuda_library": match &cuda_lib { Ok(true) => "loaded".to_string(), Ok(false) => "not installed".to_string(), Err(e) => format!("failed to load: {e}") },
        "cuda_available": cuda,
        "cuda_devices": if cuda { tch::Cuda::device_count() } else { 0 },
        "cudnn_available": cuda && tch::Cuda::cudnn_is_available(),
        "cpu_threads": tch::get_num_threads(),
        "host": host(),
    })
}
