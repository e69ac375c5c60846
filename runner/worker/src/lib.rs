//! The xlab worker: runs one job in its own process, on the device the coordinator leased to it,
//! and reports back as a stream of events (see `xlab-proto`).

pub mod amp;
pub mod check;
pub mod checkpoint;
pub mod data;
pub mod denoiser;
pub mod diffusion;
pub mod ema;
mod epoch;
pub mod evaluate;
pub mod events;
mod failure;
pub mod files;
pub mod forward;
pub mod host;
pub mod images;
pub mod invert;
pub mod model;
pub mod npz;
pub mod optim;
pub mod pack;
pub mod probe;
pub mod quality;
pub mod sample;
pub mod train;
pub mod watch;

pub use failure::{is_out_of_memory, Failure};

use events::Emitter;
use host::Components;
use std::path::{Path, PathBuf};
use xlab_plan::config::{JobConfig, Task};
use xlab_proto::{Event, FailureCause, JobRequest, PROTOCOL_VERSION};

fn device_of(lease: &str) -> Result<tch::Device, Failure> {
    if lease == "cpu" {
        return Ok(tch::Device::Cpu);
    }
    let n = lease.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).ok_or_else(|| {
        Failure::new(FailureCause::Config, format!("unknown device `{lease}`; expected `cpu` or `cuda:N`"))
    })?;
    if let Err(e) = probe::load_cuda_support() {
        return Err(Failure::new(FailureCause::Error, format!("cannot load libtorch's CUDA library: {e}")));
    }
    if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
        return Err(Failure::new(
            FailureCause::Error,
            format!("device {lease} is leased but libtorch sees {} CUDA device(s)", tch::Cuda::device_count()),
        ));
    }
    Ok(tch::Device::Cuda(n))
}

/// The default plugin folders: the worker's own folder (where the workspace builds its plugins)
/// and every folder in `XLAB_PLUGIN_PATH`.
pub fn default_plugin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.to_path_buf())).into_iter().collect();
    if let Some(p) = std::env::var_os("XLAB_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    dirs
}

/// Loads the job's plugin libraries (checking they are the files the coordinator checked) and
/// creates its components.
fn load_components(req: &JobRequest, cfg: &JobConfig) -> Result<Components, Failure> {
    let mut libs = Vec::new();
    for p in &req.plugins {
        let lib = xlab_plugin_host::load(Path::new(&p.file))
            .map_err(|m| Failure::new(FailureCause::Config, format!("plugin {}: {m}", p.file)))?;
        if lib.info.sha256 != p.sha256 {
            return Err(Failure::new(
                FailureCause::Config,
                format!(
                    "plugin {} changed since the experiment was checked (sha256 {} now, {} then); run again",
                    p.file, lib.info.sha256, p.sha256
                ),
            ));
        }
        libs.push(lib);
    }
    let mut comps = Components::default();
    for (slot, c) in cfg.components() {
        let lib = libs.iter().find(|l| l.info.components.iter().any(|k| k.id == c.id)).ok_or_else(|| {
            Failure::new(FailureCause::Config, format!("no plugin in the job request provides `{}`", c.id))
        })?;
        let inst = lib
            .instantiate(&c.id, &serde_json::Value::Object(c.params.clone()))
            .map_err(|m| Failure::new(FailureCause::Config, m))?;
        match slot {
            "step_rule" => comps.step_rule = Some(inst),
            "batch_transform" => comps.batch_transform = Some(inst),
            "sampler" => comps.sampler = Some(inst),
            "guidance" => comps.guidance = Some(inst),
            "attention" => comps.attention = Some(inst),
            "reconstruct" => comps.reconstruct = Some(inst),
            _ => comps.objective = Some(inst),
        }
    }
    Ok(comps)
}

/// Takes the job's lock in its run folder, waiting up to a minute for a worker of an earlier
/// attempt (say, one whose coordinator was killed) to notice and exit. Held until the process
/// ends, so two workers never write one job's checkpoints.
fn lock_job(run_dir: &Path) -> Result<std::fs::File, Failure> {
    let path = run_dir.join("worker.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot open {}: {e}", path.display())))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match f.try_lock() {
            Ok(()) => {
                // The holder's pid, for whoever looks for the process running this job.
                use std::io::Write;
                let mut w = &f;
                let _ = f.set_len(0).and_then(|_| writeln!(w, "{}", std::process::id()));
                return Ok(f);
            }
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Failure::new(
                    FailureCause::Error,
                    format!("another worker still holds {} after a minute", path.display()),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Failure::new(FailureCause::Error, format!("cannot lock {}: {e}", path.display())))
            }
        }
    }
}

static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// Set by SIGUSR1: stop as SIGTERM asks, but never at once, however often it comes.
static STOP_SOFT: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// The first SIGINT or SIGTERM asks the job to stop at its next epoch boundary, after a
/// checkpoint; a second one ends the process at once (exit code 130). SIGUSR1 asks the same
/// as the first, and only that: a pack's supervisor passes Slurm's signal on with it, and a
/// worker that Slurm signalled itself must not take the two for a second request.
pub fn stop_on_signals() {
    let flag = STOP.get_or_init(Default::default);
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered in this order, the conditional shutdown sees the flag as it was before this
        // signal: set by an earlier one.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, std::sync::Arc::clone(flag));
        let _ = signal_hook::flag::register(sig, std::sync::Arc::clone(flag));
    }
    let soft = STOP_SOFT.get_or_init(Default::default);
    let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, std::sync::Arc::clone(soft));
}

/// Sends this process's standard error (its log) to the end of `path`.
pub fn log_to(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    // SAFETY: dup2 onto fd 2 with a descriptor this function owns; the file is closed after,
    // fd 2 keeps its own reference.
    if unsafe { libc::dup2(file.as_raw_fd(), 2) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a stop was asked for (see [`stop_on_signals`]).
pub fn stop_requested() -> bool {
    [&STOP, &STOP_SOFT].iter().any(|s| s.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed)))
}

/// Keeps the memory libtorch frees in this process for its next allocation instead of handing it
/// back to the system. Every training step frees and allocates the same activations; with
/// glibc's defaults each block over 32 MiB (an activation of a ResNet at batch 128, every
/// evaluation batch) is a fresh mapping whose pages the kernel faults in and zeroes, step after
/// step, and the heap's top is trimmed and faulted in again likewise. A job's worker holds its
/// peak memory anyway. Left alone when glibc's malloc is tuned through the environment
/// (`MALLOC_*`).
pub fn keep_freed_memory() {
    if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_")) {
        return;
    }
    // SAFETY: mallopt only sets allocator parameters; called before the job allocates.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Ends this worker when its coordinator goes away (the worker is re-parented), so an orphan
/// never trains on beside the next attempt; the job resumes from its last checkpoint.
pub fn exit_with_parent() {
    // The coordinator names itself: a worker whose coordinator died while libtorch was still
    // loading would otherwise take its new parent (init) for the coordinator and never stop.
    let parent = std::env::var("XLAB_PARENT_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(std::os::unix::process::parent_id);
    std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("the coordinator (pid {parent}) went away; stopping");
                // At once, without the C runtime's teardown: `exit` from this thread would run
                // libtorch's static destructors while the training thread still uses libtorch,
                // and a destructor that blocks left the orphan training on forever. Every file
                // the job wrote is complete (written whole, then renamed), so nothing is torn.
                // SAFETY: _exit ends the process immediately; no Rust state is observed after.
                unsafe { libc::_exit(3) }
            }
        })
        .expect("a thread starts");
}

/// `task: noop`: sleeps, then succeeds or fails the way the config asks.
fn noop(
    n: xlab_plan::config::Noop,
    device: tch::Device,
    out: &mut Emitter,
) -> Result<std::collections::BTreeMap<String, f64>, Failure> {
    use xlab_plan::config::NoopFailure;
    std::thread::sleep(std::time::Duration::from_secs_f64(n.sleep_s));
    let names: Vec<String> = (0..n.log_metrics).map(|k| format!("m{k}")).collect();
    let start = std::time::Instant::now();
    for step in 1..=n.log_steps {
        let values = names.iter().enumerate().map(|(k, name)| (name.clone(), (step * (k as u64 + 1)) as f64)).collect();
        out.metrics(step, values);
        if n.log_rows_per_s > 0 {
            let due = std::time::Duration::from_secs_f64(step as f64 / n.log_rows_per_s as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    // How long the stream took: past its pace only if the coordinator took the rows slower.
    let streamed = (n.log_steps > 0).then(|| ("noop.stream_s".to_string(), start.elapsed().as_secs_f64()));
    match n.fail {
        NoopFailure::None => Ok([("noop.sleep_s".to_string(), n.sleep_s)].into_iter().chain(streamed).collect()),
        NoopFailure::Crash => std::process::abort(),
        NoopFailure::OutOfMemory => {
            // 2^50 floats: more than any device holds; libtorch reports it as out of memory.
            match tch::Tensor::f_empty([1i64 << 50], (tch::Kind::Float, device)) {
                Ok(_) => Err(Failure::new(FailureCause::Error, "allocated 4 PiB without complaint")),
                Err(e) => Err(Failure::from(e)),
            }
        }
        NoopFailure::Diverge => {
            Err(Failure::new(FailureCause::Diverged, "training loss is NaN (asked for by `noop.fail`)"))
        }
        NoopFailure::Error => Err(Failure::new(FailureCause::Error, "failed as `noop.fail: error` asks")),
    }
}

/// What a panic in the job says about the job: most tensor operations panic on a libtorch error
/// (tch's non-`f_` methods), so a panic carrying one is that error, classified as any other
/// (`out_of_memory` when libtorch could not allocate, on the CPU or a GPU); any other panic is a
/// bug in the worker, reported as an error with its message.
pub fn failure_of_panic(payload: &(dyn std::any::Any + Send)) -> Failure {
    let raw = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    // `called Result::unwrap() on an Err value: Torch("…\n…")`: the libtorch message, whose
    // first line says what happened (a C++ backtrace follows).
    let (libtorch, message) = match raw.split_once("Torch(\"") {
        Some((_, rest)) => {
            let inner = rest.strip_suffix("\")").unwrap_or(rest);
            let first = inner.split("\\n").next().unwrap_or(inner).replace("\\\"", "\"");
            (true, first)
        }
        None => (raw.contains("libtorch") || raw.contains("Torch"), raw.lines().next().unwrap_or(raw).to_string()),
    };
    if is_out_of_memory(&message) {
        Failure::new(FailureCause::OutOfMemory, format!("libtorch could not allocate memory: {message}"))
    } else if libtorch {
        Failure::new(FailureCause::Error, format!("libtorch error: {message}"))
    } else {
        Failure::new(
            FailureCause::Error,
            format!("the worker panicked (a bug in xlab; its log has the place): {message}"),
        )
    }
}

/// Runs one job and reports its events; returns the process exit code.
pub fn run_job(req: &JobRequest, out: &mut Emitter) -> i32 {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job_inner(req, out)))
        .unwrap_or_else(|payload| Err(failure_of_panic(payload.as_ref())));
    match result {
        Ok(summary) => {
            out.send(&Event::Finished { summary });
            0
        }
        Err(f) => {
            tracing::error!(cause = f.cause.as_str(), "{}", f.message);
            out.failed(f.cause, f.message);
            1
        }
    }
}

fn run_job_inner(req: &JobRequest, out: &mut Emitter) -> Result<std::collections::BTreeMap<String, f64>, Failure> {
    if req.protocol != PROTOCOL_VERSION {
        return Err(Failure::new(
            FailureCause::Config,
            format!(
                "the coordinator speaks protocol {} but this worker speaks {PROTOCOL_VERSION}; rebuild both together",
                req.protocol
            ),
        ));
    }
    let cfg: JobConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| Failure::new(FailureCause::Config, format!("job config: {e}")))?;
    let device = device_of(&req.lease.device)?;
    crate::amp::set_job_precision(cfg.precision);
    if cfg.deterministic {
        // The same sums in the same order on every run and every resume.
        tch::set_num_threads(1);
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(false);
            tch::Cuda::set_user_enabled_cudnn(false);
        }
    } else {
        tch::set_num_threads(req.lease.threads.max(1) as i32);
    }
    std::fs::create_dir_all(&req.run_dir)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot create {}: {e}", req.run_dir.display())))?;
    let _job_lock = lock_job(&req.run_dir)?;
    if let Err(m) = watch::start(&req.run_dir, req.step_timeout_ms.map(std::time::Duration::from_millis)) {
        tracing::warn!("{m}; crashes and hangs of this job will be reported without their step");
    }
    out.send(&Event::Started {
        pid: std::process::id(),
        device: req.lease.device.clone(),
        libtorch: probe::libtorch_version(),
        host: probe::host(),
        machine: probe::machine(&req.lease.device),
    });
    let mut comps = load_components(req, &cfg)?;
    match cfg.task {
        Task::Train => {
            let plan = files::CheckpointPlan {
                job_id: &req.job_id,
                every: req.checkpoint_every,
                every_ms: req.checkpoint_every_ms,
                every_steps: req.checkpoint_every_steps,
                pause_after: req.pause_after_epoch,
                keep_weights: &req.keep_weights,
                continue_from: req.continue_from.as_ref(),
            };
            match &cfg.diffusion {
                Some(d) => {
                    diffusion::run(&cfg, d, req.seed, device, &req.run_dir, &plan, &req.parents, &mut comps, out)
                }
                None => train::run(&cfg, req.seed, device, &req.run_dir, &plan, &req.parents, &mut comps, out),
            }
        }
        Task::Sample => sample::run(&cfg, req.seed, device, &req.run_dir, &req.parents, &mut comps, out),
        Task::Invert => invert::run(&cfg, req.seed, device, &req.run_dir, &req.parents, &mut comps, out),
        Task::Evaluate => evaluate::evaluate_parents(&cfg, &req.parents, device, out),
        Task::Noop => noop(cfg.noop.clone().unwrap_or_default(), device, out),
    }
}

/// This process's peak resident memory so far, in MiB (`getrusage`'s `ru_maxrss`).
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caught(f: impl FnOnce() + std::panic::UnwindSafe) -> Failure {
        let payload = std::panic::catch_unwind(f).expect_err("it panics");
        failure_of_panic(payload.as_ref())
    }

    #[test]
    fn libtorch_panics_are_classified() {
        // A failed CPU allocation inside a panicking tensor method: out of memory.
        let f = caught(|| {
            let _ = tch::Tensor::empty([1i64 << 50], (tch::Kind::Float, tch::Device::Cpu));
        });
        assert_eq!(f.cause, FailureCause::OutOfMemory, "{}", f.message);
        assert!(
            f.message.contains("can't allocate memory") && !f.message.contains("Exception raised"),
            "{}",
            f.message
        );
        // A shape error: a libtorch error, its first line only.
        let f = caught(|| {
            let _ = tch::Tensor::zeros([2, 3], tch::kind::FLOAT_CPU)
                .matmul(&tch::Tensor::zeros([2, 3], tch::kind::FLOAT_CPU));
        });
        assert_eq!(f.cause, FailureCause::Error);
        assert!(
            f.message.starts_with("libtorch error: ") && f.message.contains("cannot be multiplied"),
            "{}",
            f.message
        );
        assert!(!f.message.contains('\n'), "{}", f.message);
        // Anything else is a bug in the worker.
        let f = caught(|| panic!("index out of bounds"));
        assert_eq!((f.cause, f.message.contains("a bug in xlab")), (FailureCause::Error, true), "{}", f.message);
    }
}
