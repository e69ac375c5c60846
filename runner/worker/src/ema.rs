//! The exponential moving average of a model's weights (`ema:`), updated as diffusers'
//! `EMAModel.step` does, kept in checkpoints as `ema.<name>` tensors and written beside the
//! weights as `weights_ema.safetensors`.

use crate::Failure;
use tch::Tensor;
use xlab_plan::config::Ema;

/// The file beside `weights.safetensors` that holds the average, under the same names.
pub const EMA_WEIGHTS: &str = "weights_ema.safetensors";

pub struct Average {
    cfg: Ema,
    /// The averaged copy of each named tensor, in the model's order.
    shadow: Vec<(String, Tensor)>,
    /// Updates made so far (diffusers' `optimization_step`).
    pub updates: u64,
}

impl Average {
    /// Starts the average at the model's current weights.
    pub fn new(cfg: &Ema, named: &[(String, Tensor)]) -> Average {
        let shadow = named.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        Average { cfg: cfg.clone(), shadow, updates: 0 }
    }

    /// After optimizer step number `optimizer_steps` (counted from 1): an update on every
    /// `every`-th step.
    pub fn after_step(&mut self, named: &[(String, Tensor)], optimizer_steps: u64) {
        if !optimizer_steps.is_multiple_of(self.cfg.every) {
            return;
        }
        self.updates += 1;
        let d = self.cfg.decay_at(self.updates);
        tch::no_grad(|| {
            for ((_, s), (_, p)) in self.shadow.iter_mut().zip(named) {
                if p.requires_grad() {
                    // s ← s − (1 − d)(s − p)
                    let step = (&*s - p) * (1.0 - d);
                    let _ = s.g_sub_(&step);
                } else {
                    s.copy_(p);
                }
            }
        });
    }

    /// The checkpoint tensors: `ema.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow.iter().map(|(n, t)| (format!("ema.{n}"), t.shallow_clone())).collect()
    }

    /// Puts the average of a checkpoint back, with its update count.
    pub fn restore(&mut self, tensors: &[(String, Tensor)], updates: u64) -> Result<(), String> {
        for (name, s) in &mut self.shadow {
            let key = format!("ema.{name}");
            let saved = tensors.iter().find(|(n, _)| *n == key).ok_or_else(|| format!("no `{key}`"))?;
            tch::no_grad(|| s.f_copy_(&saved.1)).map_err(|e| e.to_string())?;
        }
        self.updates = updates;
        Ok(())
    }

    /// Writes the average as a weights file (the model's names).
    pub fn save(&self, path: &std::path::Path) -> Result<(), Failure> {
        let named: Vec<(&str, &Tensor)> = self.shadow.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::files::save_atomically_tensors(path, &named)
    }

    /// Runs `f` with the average in the model's place, then puts the trained weights back.
    pub fn swapped<T>(&self, named: &[(String, Tensor)], f: impl FnOnce() -> T) -> T {
        let swap = || {
            tch::no_grad(|| {
                for ((_, s), (_, p)) in self.shadow.iter().zip(named) {
                    let keep = p.detach().copy();
                    p.shallow_clone().copy_(s);
                    s.shallow_clone().copy_(&keep);
                }
            })
        };
        swap();
        let out = f();
        swap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn ema(json: &str) -> Ema {
        serde_json::from_str(json).unwrap()
    }

    /// The average's values against diffusers' `EMAModel` on a float64 parameter set to k²
    /// before its k-th step (printed by diffusers 0.3x: `EMAModel([p], **cfg)`, `e.step([p])`).
    #[test]
    fn the_average_matches_diffusers_ema_model() {
        let cases = [
            (
                r#"{"decay": 0.9}"#,
                [1.0, 3.454545454545454, 7.613636363636363, 13.41958041958042, 20.864135864135864, 29.945654345654347],
            ),
            (
                r#"{"decay": 0.99, "warmup": true, "inv_gamma": 1.0, "power": 0.75, "update_after_step": 2, "min_decay": 0.1}"#,
                [1.0, 4.0, 9.0, 13.162224902509523, 18.355354294837316, 24.59367860971463],
            ),
        ];
        for (cfg, want) in cases {
            let p = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
            let named = vec![("w".to_string(), p.shallow_clone())];
            let mut a = Average::new(&ema(cfg), &named);
            for (k, w) in want.iter().enumerate() {
                let k = k as u64 + 1;
                let _ = tch::no_grad(|| p.shallow_clone().fill_((k * k) as f64));
                a.after_step(&named, k);
                let got = f64::try_from(&a.shadow[0].1).unwrap();
                assert!((got - w).abs() < 1e-12, "{cfg}, update {k}: {got} against {w}");
            }
        }
    }

    #[test]
    fn every_skips_steps_and_untrained_tensors_are_copied() {
        let p = Tensor::from_slice(&[0.0f64]).set_requires_grad(true);
        let stats = Tensor::from_slice(&[5.0f64]);
        let named = vec![("w".to_string(), p.shallow_clone()), ("running_mean".to_string(), stats.shallow_clone())];
        let mut a = Average::new(&ema(r#"{"decay": 0.5, "every": 2}"#), &named);
        let _ = tch::no_grad(|| p.shallow_clone().fill_(2.0));
        let _ = stats.shallow_clone().fill_(7.0);
        a.after_step(&named, 1);
        assert_eq!(a.updates, 0, "step 1 of every 2 updates nothing");
        a.after_step(&named, 2);
        assert_eq!(a.updates, 1);
        // The first update has decay 0: the average takes the weights.
        assert_eq!(f64::try_from(&a.shadow[0].1).unwrap(), 2.0);
        assert_eq!(f64::try_from(&a.shadow[1].1).unwrap(), 7.0);
        // Swapping runs with the average in place and puts the weights back.
        let _ = tch::no_grad(|| p.shallow_clone().fill_(4.0));
        let seen = a.swapped(&named, || f64::try_from(&p).unwrap());
        assert_eq!((seen, f64::try_from(&p).unwrap()), (2.0, 4.0));
        assert_eq!(p.kind(), Kind::Double);
    }
}
