//! Mixed precision (`precision: bf16`): libtorch's autocast around the forward pass and the loss,
//! through a small C++ shim (`cpp/autocast.cpp`), since tch turns on only CUDA's fp16 autocast.
//! bfloat16 has fp32's exponent range, so no loss scaling is needed.

use std::sync::atomic::{AtomicU8, Ordering};
use tch::{Device, Kind, Tensor};
use xlab_spec::config::Precision;

extern "C" {
    fn xlab_autocast_enter(device: i32, dtype: i32) -> i32;
    fn xlab_autocast_exit(device: i32) -> i32;
    fn xlab_autocast_is_enabled(device: i32) -> i32;
}

fn device_code(device: Device) -> i32 {
    if device.is_cuda() {
        1
    } else {
        0
    }
}

/// The precision of the job this process runs (one job per worker process).
static JOB_PRECISION: AtomicU8 = AtomicU8::new(0);

pub fn set_job_precision(p: Precision) {
    JOB_PRECISION.store(if p == Precision::Bf16 { 1 } else { 0 }, Ordering::SeqCst);
}

fn job_precision() -> Precision {
    if JOB_PRECISION.load(Ordering::SeqCst) == 1 {
        Precision::Bf16
    } else {
        Precision::Fp32
    }
}

/// Autocast on `device` in the job's precision while the region lives.
pub fn job_region(device: Device) -> Result<Region, String> {
    Region::enter(job_precision(), device)
}

/// Autocast on `device` while this lives (nothing for fp32).
pub struct Region {
    device: Option<i32>,
}

impl Region {
    pub fn enter(precision: Precision, device: Device) -> Result<Region, String> {
        let dtype = match precision {
            Precision::Fp32 => return Ok(Region { device: None }),
            Precision::Bf16 => 0,
        };
        let code = device_code(device);
        // SAFETY: plain C calls into libtorch's thread-local autocast state; the shim catches
        // every C++ exception.
        if unsafe { xlab_autocast_enter(code, dtype) } != 0 {
            return Err(format!("libtorch refused autocast for {precision:?} on {device:?}"));
        }
        Ok(Region { device: Some(code) })
    }

    pub fn is_enabled(device: Device) -> bool {
        // SAFETY: reads libtorch's thread-local autocast flag.
        unsafe { xlab_autocast_is_enabled(device_code(device)) != 0 }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(code) = self.device {
            // SAFETY: closes the region `enter` opened on this thread.
            unsafe {
                xlab_autocast_exit(code);
            }
        }
    }
}

/// Logits in fp32 whatever autocast computed them in (the loss and the statistics read them).
pub fn full(t: Tensor) -> Tensor {
    if t.kind() == Kind::Float || t.kind() == Kind::Double {
        t
    } else {
        t.to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_autocast_runs_a_matmul_in_bfloat16_on_the_cpu_and_only_inside_the_region() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        assert_eq!(a.mm(&a).kind(), Kind::Float);
        {
            let _r = Region::enter(Precision::Bf16, Device::Cpu).unwrap();
            assert!(Region::is_enabled(Device::Cpu));
            assert_eq!(a.mm(&a).kind(), Kind::BFloat16);
            // Reductions that autocast keeps in fp32 stay there.
            assert_eq!(a.log_softmax(-1, None::<Kind>).kind(), Kind::Float);
        }
        assert!(!Region::is_enabled(Device::Cpu));
        assert_eq!(a.mm(&a).kind(), Kind::Float);
        let _none = Region::enter(Precision::Fp32, Device::Cpu).unwrap();
        assert!(!Region::is_enabled(Device::Cpu));
    }
}
