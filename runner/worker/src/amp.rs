//! Mixed precision (`precision: bf16 | fp16`): libtorch's autocast around the forward pass and
//! the loss, through a small C++ shim (`cpp/autocast.cpp`), since tch turns on only CUDA's fp16
//! autocast. bfloat16 has fp32's exponent range, so it needs no loss scaling; fp16 training
//! scales the loss dynamically ([`Scaler`], PyTorch's `GradScaler`).

use std::sync::atomic::{AtomicU8, Ordering};
use tch::{Device, Kind, Tensor};
use xlab_plan::config::Precision;

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
    let code = match p {
        Precision::Fp32 => 0,
        Precision::Bf16 => 1,
        Precision::Fp16 => 2,
    };
    JOB_PRECISION.store(code, Ordering::SeqCst);
}

fn job_precision() -> Precision {
    match JOB_PRECISION.load(Ordering::SeqCst) {
        1 => Precision::Bf16,
        2 => Precision::Fp16,
        _ => Precision::Fp32,
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
            Precision::Fp16 => 1,
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

/// Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler` with `unscale_` before the
/// step: the scale is a float32, the gradients are multiplied by its float32 reciprocal, and
/// [`Scaler::update`] backs off or grows it once per optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    pub scale: f32,
    /// Finite steps in a row since the scale last changed.
    pub growth_tracker: u32,
    cfg: xlab_plan::config::LossScale,
}

impl Scaler {
    pub fn new(cfg: xlab_plan::config::LossScale) -> Self {
        Scaler { scale: cfg.init as f32, growth_tracker: 0, cfg }
    }

    /// Divides the gradients by the scale in place; returns whether any was not finite (inf or
    /// NaN), in which case all of them are zeroed, so a step rule reading them sees no step.
    pub fn unscale(&self, grads: &[Tensor]) -> bool {
        if grads.is_empty() {
            return false;
        }
        // The float32 reciprocal; a float tensor times this (exact in f64) computes in float32.
        let inv = f64::from((1.0 / f64::from(self.scale)) as f32);
        tch::no_grad(|| {
            let bad: Vec<Tensor> = grads.iter().map(|g| g.isfinite().logical_not().any()).collect();
            let found = bool::try_from(Tensor::stack(&bad, 0).any()).unwrap_or(true);
            for g in grads {
                let mut g = g.shallow_clone();
                if found {
                    let _ = g.zero_();
                } else {
                    let _ = g.g_mul_scalar_(inv);
                }
            }
            found
        })
    }

    /// After an optimizer step: back off if the step found a non-finite gradient, else count it
    /// and grow the scale every `growth_interval` such steps (`torch._amp_update_scale_`).
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (f64::from(self.scale) * self.cfg.backoff_factor) as f32;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.cfg.growth_interval {
                self.scale = (f64::from(self.scale) * self.cfg.growth_factor) as f32;
                self.growth_tracker = 0;
            }
        }
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

    #[test]
    fn fp16_autocast_runs_a_matmul_in_half_on_the_cpu() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let _r = Region::enter(Precision::Fp16, Device::Cpu).unwrap();
        assert_eq!(a.mm(&a).kind(), Kind::Half);
    }

    #[test]
    fn the_scaler_backs_off_on_overflow_and_grows_after_its_interval() {
        let cfg =
            xlab_plan::config::LossScale { init: 1024.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
        let mut s = Scaler::new(cfg);
        let g = Tensor::from_slice(&[2048.0f32, -512.0]);
        assert!(!s.unscale(std::slice::from_ref(&g)));
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![2.0, -0.5]);
        let bad = Tensor::from_slice(&[f32::INFINITY, 1.0]);
        assert!(s.unscale(&[g.shallow_clone(), bad.shallow_clone()]));
        assert_eq!(Vec::<f32>::try_from(&bad).unwrap(), vec![0.0, 0.0], "a skipped step's gradients are zeroed");
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (512.0, 0));
        for _ in 0..2 {
            s.update(false);
        }
        assert_eq!((s.scale, s.growth_tracker), (512.0, 2));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (1024.0, 0));
    }
}
