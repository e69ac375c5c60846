//! The xlab worker: runs one job in its own process, on the device the coordinator leased to it,
//! and reports back as a stream of events (see `xlab-proto`).

pub mod data;
pub mod events;
pub mod model;
pub mod probe;
pub mod train;

use events::Emitter;
use train::Failure;
use xlab_proto::{Event, FailureCause, JobRequest, PROTOCOL_VERSION};
use xlab_spec::config::{JobConfig, Task};

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

/// Runs one job and reports its events; returns the process exit code.
pub fn run_job(req: &JobRequest, out: &mut Emitter) -> i32 {
    let result = (|| {
        if req.protocol != PROTOCOL_VERSION {
            return Err(Failure::new(
                FailureCause::Config,
                format!("the coordinator speaks protocol {} but this worker speaks {PROTOCOL_VERSION}; rebuild both together", req.protocol),
            ));
        }
        let cfg: JobConfig = serde_json::from_value(req.config.clone())
            .map_err(|e| Failure::new(FailureCause::Config, format!("job config: {e}")))?;
        tch::set_num_threads(req.lease.threads.max(1) as i32);
        let device = device_of(&req.lease.device)?;
        std::fs::create_dir_all(&req.run_dir)
            .map_err(|e| Failure::new(FailureCause::Error, format!("cannot create {}: {e}", req.run_dir.display())))?;
        out.send(&Event::Started {
            pid: std::process::id(),
            device: req.lease.device.clone(),
            libtorch: probe::libtorch_version(),
            host: probe::host(),
        });
        match cfg.task {
            Task::Train => train::run(&cfg, req.seed, device, &req.run_dir, out),
        }
    })();
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
