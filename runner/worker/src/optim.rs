//! Base optimizers, written out so their state can be checkpointed and restored exactly.
//!
//! The update rules follow PyTorch's `torch.optim` single-tensor implementations (2.x):
//! - SGD: d = g + wd·p; with momentum, buf = d on the first step, else buf = m·buf + (1−τ)·d
//!   (τ = dampening = 0); d = d + m·buf with nesterov, else d = buf; p ← p − lr·d.
//! - Adam: g ← g + wd·p (coupled L2); AdamW: p ← p·(1 − lr·wd) (decoupled). Then
//!   m ← m + (1−β₁)(g − m), v ← β₂v + (1−β₂)g², p ← p − (lr/(1−β₁ᵗ))·m/(√v/√(1−β₂ᵗ) + ε).
//!
//! Deviation: PyTorch fuses `add(alpha=…)`, `addcmul` and `addcdiv`; here they are separate
//! tensor operations, so results agree to float rounding, not always bit for bit.

use tch::Tensor;
use xlab_plan::config::OptimizerConfig;

/// Per-parameter state.
#[derive(Default)]
struct Slot {
    momentum_buffer: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<(String, Tensor)>,
    slots: Vec<Slot>,
    /// Steps taken (Adam's t).
    pub steps: u64,
    /// The learning-rate schedule's factor for the next step.
    pub lr_factor: f64,
    /// All parameters as views of one buffer (when they share a kind and device), so an update
    /// is a handful of kernels over the buffer instead of a handful per parameter. The state
    /// buffers are flat alike, and each slot holds views of them.
    flat: Option<Flat>,
}

struct Flat {
    params: Tensor,
    sizes: Vec<i64>,
    /// Flat state buffers, each `None` until it exists for every parameter.
    momentum: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
}

impl Flat {
    /// Per-parameter views of a flat buffer, shaped like the parameters.
    fn views(&self, buf: &Tensor, params: &[(String, Tensor)]) -> Vec<Tensor> {
        let mut at = 0;
        params
            .iter()
            .zip(&self.sizes)
            .map(|((_, p), &n)| {
                let v = buf.narrow(0, at, n).view(p.size().as_slice());
                at += n;
                v
            })
            .collect()
    }
}

/// The optimizer state of one parameter, or of the flat buffer of all of them.
struct State<'a> {
    momentum: &'a mut Option<Tensor>,
    exp_avg: &'a mut Option<Tensor>,
    exp_avg_sq: &'a mut Option<Tensor>,
}

/// One update of `p` with gradient `g` (the rules in this module's documentation), at step `t`
/// with the schedule's `factor` on the learning rate.
fn update(cfg: &OptimizerConfig, p: &mut Tensor, g: Tensor, state: State<'_>, factor: f64, t: i32) {
    match cfg {
        OptimizerConfig::Sgd(o) => {
            let mut d = if o.weight_decay != 0.0 { &g + &*p * o.weight_decay } else { g };
            if o.momentum != 0.0 {
                let buf = match state.momentum.take() {
                    None => d.detach().copy(),
                    Some(mut b) => {
                        let _ = b.g_mul_scalar_(o.momentum);
                        let _ = b.g_add_(&d);
                        b
                    }
                };
                d = if o.nesterov { &d + &buf * o.momentum } else { buf.shallow_clone() };
                *state.momentum = Some(buf);
            }
            let _ = p.g_sub_(&(d * (o.lr * factor)));
        }
        OptimizerConfig::Adam(o) | OptimizerConfig::AdamW(o) => {
            let decoupled = matches!(cfg, OptimizerConfig::AdamW(_));
            let g = if o.weight_decay != 0.0 && !decoupled { &g + &*p * o.weight_decay } else { g };
            let lr = o.lr * factor;
            if o.weight_decay != 0.0 && decoupled {
                let _ = p.g_mul_scalar_(1.0 - lr * o.weight_decay);
            }
            let m = state.exp_avg.get_or_insert_with(|| g.zeros_like());
            let _ = m.lerp_(&g, 1.0 - o.beta1);
            let v = state.exp_avg_sq.get_or_insert_with(|| g.zeros_like());
            let _ = v.g_mul_scalar_(o.beta2);
            let _ = v.g_add_(&(&g * &g * (1.0 - o.beta2)));
            let bc1 = 1.0 - o.beta1.powi(t);
            let bc2 = 1.0 - o.beta2.powi(t);
            let denom = v.sqrt() / bc2.sqrt() + o.eps;
            let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
        }
    }
}

impl Optimizer {
    /// An optimizer over named parameters (references to the model's tensors). Parameters of
    /// one kind on one device are moved into a single buffer (their values unchanged).
    pub fn new(cfg: &OptimizerConfig, params: Vec<(String, Tensor)>) -> Self {
        let slots = params.iter().map(|_| Slot::default()).collect();
        let same = params.windows(2).all(|w| w[0].1.kind() == w[1].1.kind() && w[0].1.device() == w[1].1.device());
        let flat = (params.len() > 1 && same).then(|| {
            let sizes: Vec<i64> = params.iter().map(|(_, p)| p.numel() as i64).collect();
            let buf = Tensor::cat(&params.iter().map(|(_, p)| p.detach().reshape([-1])).collect::<Vec<_>>(), 0);
            let flat = Flat { params: buf, sizes, momentum: None, exp_avg: None, exp_avg_sq: None };
            for ((_, p), v) in params.iter().zip(flat.views(&flat.params, &params)) {
                p.shallow_clone().set_data(&v);
            }
            flat
        });
        Optimizer { cfg: cfg.clone(), params, slots, steps: 0, lr_factor: 1.0, flat }
    }

    /// One update over the flat buffer; `false` (nothing done) when some parameter has no
    /// gradient or the state is not all flat, for the per-parameter path to take.
    fn step_flat(&mut self, t: i32) -> bool {
        let Some(flat) = self.flat.as_mut() else { return false };
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        if grads.iter().any(|g| !g.defined()) {
            return false;
        }
        let fresh = self.steps == 1;
        let g = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
        let p = &mut flat.params;
        let state =
            State { momentum: &mut flat.momentum, exp_avg: &mut flat.exp_avg, exp_avg_sq: &mut flat.exp_avg_sq };
        let exists = match &self.cfg {
            OptimizerConfig::Sgd(o) => o.momentum == 0.0 || state.momentum.is_some(),
            _ => state.exp_avg.is_some() && state.exp_avg_sq.is_some(),
        };
        if !exists && !fresh {
            return false;
        }
        update(&self.cfg, p, g, state, self.lr_factor, t);
        self.link_slots();
        true
    }

    /// Points every slot at its views of the flat state buffers.
    fn link_slots(&mut self) {
        let Some(flat) = &self.flat else { return };
        for (buf, key) in [(&flat.momentum, 0), (&flat.exp_avg, 1), (&flat.exp_avg_sq, 2)] {
            let Some(buf) = buf else { continue };
            for (slot, v) in self.slots.iter_mut().zip(flat.views(buf, &self.params)) {
                *[&mut slot.momentum_buffer, &mut slot.exp_avg, &mut slot.exp_avg_sq][key] = Some(v);
            }
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update with the gradients now in `.grad`.
    pub fn step(&mut self) {
        self.steps += 1;
        let t = self.steps as i32;
        if tch::no_grad(|| self.step_flat(t)) {
            return;
        }
        // A per-parameter step leaves the slots' state apart from the flat buffers.
        if let Some(f) = self.flat.as_mut() {
            f.momentum = None;
            f.exp_avg = None;
            f.exp_avg_sq = None;
        }
        let (cfg, factor) = (&self.cfg, self.lr_factor);
        tch::no_grad(|| {
            for ((_, p), slot) in self.params.iter_mut().zip(&mut self.slots) {
                let g = p.grad();
                if g.defined() {
                    let state = State {
                        momentum: &mut slot.momentum_buffer,
                        exp_avg: &mut slot.exp_avg,
                        exp_avg_sq: &mut slot.exp_avg_sq,
                    };
                    update(cfg, p, g, state, factor, t);
                }
            }
        });
    }

    /// The state as named tensors: `optim.<param>.<buffer>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, _), s) in self.params.iter().zip(&self.slots) {
            for (key, t) in
                [("momentum_buffer", &s.momentum_buffer), ("exp_avg", &s.exp_avg), ("exp_avg_sq", &s.exp_avg_sq)]
            {
                if let Some(t) = t {
                    out.push((format!("optim.{name}.{key}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores state saved by [`Optimizer::state_tensors`].
    pub fn load_state(&mut self, steps: u64, tensors: &[(String, Tensor)]) -> Result<(), String> {
        self.steps = steps;
        for ((name, p), s) in self.params.iter().zip(&mut self.slots) {
            let get = |key: &str| {
                tensors
                    .iter()
                    .find(|(n, _)| *n == format!("optim.{name}.{key}"))
                    .map(|(_, t)| t.to_device(p.device()).to_kind(p.kind()))
            };
            s.momentum_buffer = get("momentum_buffer");
            s.exp_avg = get("exp_avg");
            s.exp_avg_sq = get("exp_avg_sq");
        }
        // Restored state that covers every parameter becomes flat again.
        if let Some(flat) = self.flat.as_mut() {
            let gather = |pick: &dyn Fn(&Slot) -> &Option<Tensor>| -> Option<Tensor> {
                let parts: Option<Vec<Tensor>> =
                    self.slots.iter().map(|s| pick(s).as_ref().map(|t| t.reshape([-1]))).collect();
                parts.map(|p| Tensor::cat(&p, 0))
            };
            flat.momentum = gather(&|s| &s.momentum_buffer);
            flat.exp_avg = gather(&|s| &s.exp_avg);
            flat.exp_avg_sq = gather(&|s| &s.exp_avg_sq);
        }
        self.link_slots();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use xlab_plan::config::{Adam, Sgd};

    fn quad(cfg: OptimizerConfig, steps: usize) -> Vec<f64> {
        let w = Tensor::from_slice(&[3.0f64, 4.0]).set_requires_grad(true);
        let a = Tensor::from_slice(&[1.0f64, 2.0]);
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]);
        for _ in 0..steps {
            opt.zero_grad();
            let loss = (&a * &w * &w).sum(Kind::Double) * 0.5;
            loss.backward();
            opt.step();
        }
        Vec::<f64>::try_from(&w).unwrap()
    }

    /// Hand-worked: L = ½(w₁² + 2w₂²), w = (3, 4), g = (3, 8).
    #[test]
    fn sgd_momentum_nesterov_and_weight_decay_follow_pytorch() {
        // Plain SGD lr 0.1: w' = (2.7, 3.2).
        let w = quad(OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: false }), 1);
        assert!((w[0] - 2.7).abs() < 1e-12 && (w[1] - 3.2).abs() < 1e-12, "{w:?}");
        // Momentum 0.9, two steps: buf₁ = g₁ = (3, 8) → w₁ = (2.7, 3.2); g₂ = (2.7, 6.4),
        // buf₂ = 0.9·buf₁ + g₂ = (5.4, 13.6) → w₂ = (2.16, 1.84).
        let w = quad(OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0, nesterov: false }), 2);
        assert!((w[0] - 2.16).abs() < 1e-12 && (w[1] - 1.84).abs() < 1e-12, "{w:?}");
        // Nesterov, one step: d = g + 0.9·buf = 1.9·g → w = (3 − 0.57, 4 − 1.52).
        let w = quad(OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0, nesterov: true }), 1);
        assert!((w[0] - 2.43).abs() < 1e-12 && (w[1] - 2.48).abs() < 1e-12, "{w:?}");
        // Weight decay 0.5: d = g + 0.5·w = (4.5, 10) → w = (2.55, 3.0).
        let w = quad(OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.5, nesterov: false }), 1);
        assert!((w[0] - 2.55).abs() < 1e-12 && (w[1] - 3.0).abs() < 1e-12, "{w:?}");
    }

    #[test]
    fn adam_first_step_moves_by_lr_and_adamw_decays_first() {
        // Adam's first step is lr·g/(|g| + ε′) ≈ lr·sign(g).
        let adam = Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let w = quad(OptimizerConfig::Adam(adam.clone()), 1);
        assert!((w[0] - 2.9).abs() < 1e-7 && (w[1] - 3.9).abs() < 1e-7, "{w:?}");
        // AdamW wd 0.1: w ← w·(1 − 0.01) first, then the same Adam step (g taken before decay).
        let w = quad(OptimizerConfig::AdamW(Adam { weight_decay: 0.1, ..adam }), 1);
        assert!((w[0] - (3.0 * 0.99 - 0.1)).abs() < 1e-7 && (w[1] - (4.0 * 0.99 - 0.1)).abs() < 1e-7, "{w:?}");
    }

    /// Several parameters share one flat buffer; the arithmetic is the per-parameter one, bit
    /// for bit, and the state saved per parameter restores into a flat optimizer.
    #[test]
    fn a_flat_update_equals_per_parameter_updates() {
        let sgd = OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01, nesterov: true });
        let adamw = OptimizerConfig::AdamW(Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
        for cfg in [sgd, adamw] {
            let make = || {
                vec![
                    Tensor::from_slice(&[3.0f32, -4.0, 0.5]).set_requires_grad(true),
                    Tensor::from_slice(&[1.5f32, 2.0, -1.0, 0.25]).reshape([2, 2]).set_requires_grad(true),
                ]
            };
            let loss =
                |ws: &[Tensor]| (&ws[0] * &ws[0]).sum(Kind::Float) * 0.7 + (&ws[1] * &ws[1] * &ws[1]).sum(Kind::Float);
            let together = make();
            let mut opt = Optimizer::new(
                &cfg,
                together.iter().enumerate().map(|(i, w)| (format!("w{i}"), w.shallow_clone())).collect(),
            );
            assert!(opt.flat.is_some());
            let apart = make();
            let mut opts: Vec<Optimizer> =
                apart.iter().map(|w| Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())])).collect();
            for _ in 0..3 {
                opt.zero_grad();
                opts.iter_mut().for_each(Optimizer::zero_grad);
                loss(&together).backward();
                loss(&apart).backward();
                opt.step();
                opts.iter_mut().for_each(Optimizer::step);
            }
            for (a, b) in together.iter().zip(&apart) {
                assert!(a.equal(b), "{a:?} vs {b:?}");
            }
            let saved: Vec<(String, Tensor)> = opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let mut again = Optimizer::new(
                &cfg,
                together.iter().enumerate().map(|(i, w)| (format!("w{i}"), w.shallow_clone())).collect(),
            );
            again.load_state(opt.steps, &saved).unwrap();
            for ((n, a), (m, b)) in again.state_tensors().iter().zip(&saved) {
                assert!(n == m && a.equal(b), "{n}");
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let cfg = OptimizerConfig::Adam(Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let w = Tensor::from_slice(&[3.0f64, 4.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]);
        (&w * &w).sum(Kind::Double).backward();
        opt.step();
        let saved: Vec<(String, Tensor)> = opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
        assert_eq!(saved.len(), 2);
        let mut other = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]);
        other.load_state(opt.steps, &saved).unwrap();
        assert_eq!(other.steps, 1);
        assert!(other.state_tensors()[1].1.equal(&saved[1].1));
    }
}
