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
