//! Base optimizers, written out so their state can be checkpointed and restored exactly.
//!
//! The update rules follow PyTorch's `torch.optim` (2.x):
//! - SGD: d = g + wd·p; with momentum, buf = d on the first step, else buf = m·buf + (1−τ)·d
//!   (τ = dampening = 0); d = d + m·buf with nesterov, else d = buf; p ← p − lr·d.
//! - Adam: g ← g + wd·p (coupled L2); AdamW: p ← p·(1 − lr·wd) (decoupled). Then
//!   m ← m + (1−β₁)(g − m), v ← β₂v + (1−β₂)g², p ← p − (lr/(1−β₁ᵗ))·m/(√v/√(1−β₂ᵗ) + ε).
//!
//! A step runs libtorch's fused kernels, those of `torch.optim.SGD/Adam/AdamW(fused=True)`: one
//! call for all the parameters, one pass over each parameter's memory and no temporaries (on a
//! GPU, a few kernel launches for the whole model). A parameter those kernels cannot take (its
//! value, gradient or state not contiguous, or of another kind or device than the rest) is
//! updated by the same rules written as tensor operations; the two agree to float rounding.
//!
//! [`Optimizer::zero_grad`] drops the gradients, as PyTorch's `zero_grad()` does
//! (`set_to_none=True`): the next backward pass writes fresh ones instead of adding into zeroed
//! buffers, and a parameter that gets no gradient in a step is not updated by it.

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Kind, Tensor};
use xlab_plan::config::OptimizerConfig;

extern "C" {
    fn xlab_drop_grads(ts: *const *const c_void, n: usize);
    fn xlab_fused_sgd(
        params: *const *const c_void,
        grads: *const *const c_void,
        bufs: *const *const c_void,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: c_int,
        first: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
    fn xlab_fused_adam(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        step: *const c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        decoupled: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> c_int;
}

/// The shim's `at::Tensor*` for each tensor.
fn ptrs(ts: &[&Tensor]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.as_ptr().cast::<c_void>()).collect()
}

/// Runs a shim call that reports failure as a nonzero return and a message.
fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = [0 as c_char; 512];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated message of at most `err.len()` bytes.
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(format!("the optimizer step failed: {message}"))
}

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
    /// Adam's t as the fused kernel reads it: a float on the parameters' device.
    step_tensor: Option<Tensor>,
}

/// The optimizer state of one parameter.
struct State<'a> {
    momentum: &'a mut Option<Tensor>,
    exp_avg: &'a mut Option<Tensor>,
    exp_avg_sq: &'a mut Option<Tensor>,
}

/// One update of `p` with gradient `g` (the rules in this module's documentation), at step `t`
/// with the schedule's `factor` on the learning rate, as tensor operations.
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

/// Whether the fused kernels take a tensor alongside `like`: contiguous, of its kind and on its
/// device.
fn fits(t: &Tensor, like: &Tensor) -> bool {
    t.is_contiguous() && t.kind() == like.kind() && t.device() == like.device()
}

impl Optimizer {
    /// An optimizer over named parameters (references to the model's tensors).
    pub fn new(cfg: &OptimizerConfig, params: Vec<(String, Tensor)>) -> Self {
        let slots = params.iter().map(|_| Slot::default()).collect();
        Optimizer { cfg: cfg.clone(), params, slots, steps: 0, lr_factor: 1.0, step_tensor: None }
    }

    /// Drops every parameter's gradient.
    pub fn zero_grad(&mut self) {
        let ts: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        // SAFETY: the pointers are live tensors of `self.params`.
        unsafe { xlab_drop_grads(ptrs(&ts).as_ptr(), ts.len()) };
    }

    /// One update with the gradients now in `.grad`; parameters without one are left as they are.
    pub fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        let t = self.steps as i32;
        tch::no_grad(|| self.step_fused(t))
    }

    /// The fused update of every parameter the kernels take, then the rest one by one.
    fn step_fused(&mut self, t: i32) -> Result<(), String> {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        let Some(first) =
            self.params.iter().zip(&grads).find(|(_, g)| g.defined()).map(|((_, p), _)| p.shallow_clone())
        else {
            return Ok(());
        };
        let floating = matches!(first.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        let mut fused = vec![false; self.params.len()];
        let factor = self.lr_factor;
        match self.cfg.clone() {
            OptimizerConfig::Sgd(o) => {
                // Parameters whose momentum buffer starts now, and those that have one.
                let (mut fresh, mut going) = (Vec::new(), Vec::new());
                for (i, ((_, p), g)) in self.params.iter().zip(&grads).enumerate() {
                    if !(floating && g.defined() && fits(p, &first) && fits(g, &first)) {
                        continue;
                    }
                    match &self.slots[i].momentum_buffer {
                        _ if o.momentum == 0.0 => going.push(i),
                        None => fresh.push(i),
                        Some(b) if fits(b, &first) => going.push(i),
                        Some(_) => continue,
                    }
                    fused[i] = true;
                }
                for &i in &fresh {
                    self.slots[i].momentum_buffer = Some(grads[i].empty_like());
                }
                for (which, is_first) in [(fresh, true), (going, false)] {
                    if which.is_empty() {
                        continue;
                    }
                    let p: Vec<&Tensor> = which.iter().map(|&i| &self.params[i].1).collect();
                    let g: Vec<&Tensor> = which.iter().map(|&i| &grads[i]).collect();
                    let b: Vec<&Tensor> = if o.momentum == 0.0 {
                        Vec::new()
                    } else {
                        which.iter().filter_map(|&i| self.slots[i].momentum_buffer.as_ref()).collect()
                    };
                    let (p, g, b) = (ptrs(&p), ptrs(&g), ptrs(&b));
                    checked(|err, cap| {
                        // SAFETY: the pointers are live tensors, `n` of each (none for `b`
                        // without momentum, which the shim then does not read).
                        unsafe {
                            xlab_fused_sgd(
                                p.as_ptr(),
                                g.as_ptr(),
                                b.as_ptr(),
                                p.len(),
                                o.weight_decay,
                                o.momentum,
                                o.lr * factor,
                                c_int::from(o.nesterov),
                                c_int::from(is_first),
                                err,
                                cap,
                            )
                        }
                    })?;
                }
            }
            OptimizerConfig::Adam(o) | OptimizerConfig::AdamW(o) => {
                let decoupled = matches!(self.cfg, OptimizerConfig::AdamW(_));
                let mut which = Vec::new();
                for (i, ((_, p), g)) in self.params.iter().zip(&grads).enumerate() {
                    let slot = &self.slots[i];
                    let state_fits =
                        [&slot.exp_avg, &slot.exp_avg_sq].iter().all(|s| s.as_ref().is_none_or(|s| fits(s, &first)));
                    if floating && g.defined() && fits(p, &first) && fits(g, &first) && state_fits {
                        which.push(i);
                        fused[i] = true;
                    }
                }
                if !which.is_empty() {
                    for &i in &which {
                        let slot = &mut self.slots[i];
                        slot.exp_avg.get_or_insert_with(|| grads[i].zeros_like());
                        slot.exp_avg_sq.get_or_insert_with(|| grads[i].zeros_like());
                    }
                    let step = match &mut self.step_tensor {
                        Some(s) if s.device() == first.device() => s,
                        slot => slot.insert(Tensor::zeros([], (Kind::Float, first.device()))),
                    };
                    let _ = step.fill_(f64::from(t));
                    let p: Vec<&Tensor> = which.iter().map(|&i| &self.params[i].1).collect();
                    let g: Vec<&Tensor> = which.iter().map(|&i| &grads[i]).collect();
                    let m: Vec<&Tensor> = which.iter().filter_map(|&i| self.slots[i].exp_avg.as_ref()).collect();
                    let v: Vec<&Tensor> = which.iter().filter_map(|&i| self.slots[i].exp_avg_sq.as_ref()).collect();
                    let (p, g, m, v) = (ptrs(&p), ptrs(&g), ptrs(&m), ptrs(&v));
                    let step = step.as_ptr().cast::<c_void>();
                    checked(|err, cap| {
                        // SAFETY: the pointers are live tensors, `n` of each, and `step` one.
                        unsafe {
                            xlab_fused_adam(
                                p.as_ptr(),
                                g.as_ptr(),
                                m.as_ptr(),
                                v.as_ptr(),
                                step,
                                p.len(),
                                o.lr * factor,
                                o.beta1,
                                o.beta2,
                                o.weight_decay,
                                o.eps,
                                c_int::from(decoupled),
                                err,
                                cap,
                            )
                        }
                    })?;
                }
            }
        }
        let cfg = &self.cfg;
        for (((_, p), slot), (g, done)) in self.params.iter_mut().zip(&mut self.slots).zip(grads.into_iter().zip(fused))
        {
            if g.defined() && !done {
                let state = State {
                    momentum: &mut slot.momentum_buffer,
                    exp_avg: &mut slot.exp_avg,
                    exp_avg_sq: &mut slot.exp_avg_sq,
                };
                update(cfg, p, g, state, factor, t);
            }
        }
        Ok(())
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
                    .map(|(_, t)| t.to_device(p.device()).to_kind(p.kind()).contiguous())
            };
            s.momentum_buffer = get("momentum_buffer");
            s.exp_avg = get("exp_avg");
            s.exp_avg_sq = get("exp_avg_sq");
        }
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
            opt.step().unwrap();
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

    /// The fused kernels follow the rules the per-parameter path writes out, to float rounding,
    /// over several steps; a parameter they cannot take (a transposed view, not contiguous)
    /// goes the per-parameter way in the same step; and the state saved per parameter restores.
    #[test]
    fn the_fused_update_equals_the_rules_written_out() {
        let sgd = OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01, nesterov: true });
        let plain = OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: false });
        let adam = Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        for cfg in [sgd, plain, OptimizerConfig::Adam(adam.clone()), OptimizerConfig::AdamW(adam)] {
            let make = || {
                vec![
                    Tensor::from_slice(&[3.0f32, -4.0, 0.5]).set_requires_grad(true),
                    Tensor::from_slice(&[1.5f32, 2.0, -1.0, 0.25]).reshape([2, 2]).set_requires_grad(true),
                    Tensor::from_slice(&[0.5f32, -0.25, 1.0, 2.0, -1.5, 0.75])
                        .reshape([2, 3])
                        .tr()
                        .set_requires_grad(true),
                ]
            };
            let loss = |ws: &[Tensor]| {
                (&ws[0] * &ws[0]).sum(Kind::Float) * 0.7
                    + (&ws[1] * &ws[1] * &ws[1]).sum(Kind::Float)
                    + (&ws[2] * &ws[2]).sum(Kind::Float) * 0.3
            };
            let fused = make();
            assert!(!fused[2].is_contiguous());
            let mut opt = Optimizer::new(
                &cfg,
                fused.iter().enumerate().map(|(i, w)| (format!("w{i}"), w.shallow_clone())).collect(),
            );
            let written = make();
            let mut state: Vec<Slot> = written.iter().map(|_| Slot::default()).collect();
            for t in 1..=3 {
                opt.zero_grad();
                loss(&fused).backward();
                opt.step().unwrap();
                loss(&written).backward();
                for (w, s) in written.iter().zip(&mut state) {
                    let mut g = w.grad();
                    let mut p = w.shallow_clone();
                    let st = State {
                        momentum: &mut s.momentum_buffer,
                        exp_avg: &mut s.exp_avg,
                        exp_avg_sq: &mut s.exp_avg_sq,
                    };
                    tch::no_grad(|| update(&cfg, &mut p, g.copy(), st, 1.0, t));
                    let _ = g.zero_();
                }
            }
            for (a, b) in fused.iter().zip(&written) {
                assert!(a.allclose(b, 1e-6, 1e-7, false), "{cfg:?}: {a:?} vs {b:?}");
            }
            let saved: Vec<(String, Tensor)> = opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
            let mut again = Optimizer::new(
                &cfg,
                fused.iter().enumerate().map(|(i, w)| (format!("w{i}"), w.shallow_clone())).collect(),
            );
            again.load_state(opt.steps, &saved).unwrap();
            for ((n, a), (m, b)) in again.state_tensors().iter().zip(&saved) {
                assert!(n == m && a.equal(b), "{n}");
            }
        }
    }

    /// `zero_grad` drops the gradients, and a parameter without one this step keeps its value
    /// and its momentum, as PyTorch's optimizers do.
    #[test]
    fn dropped_gradients_leave_an_unused_parameter_alone() {
        let cfg = OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0, nesterov: false });
        let (a, b) = (
            Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true),
            Tensor::from_slice(&[3.0f32]).set_requires_grad(true),
        );
        let mut opt = Optimizer::new(&cfg, vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())]);
        ((&a * &a).sum(Kind::Float) + (&b * &b).sum(Kind::Float)).backward();
        opt.step().unwrap();
        let b_after = b.copy();
        opt.zero_grad();
        assert!(!a.grad().defined() && !b.grad().defined());
        (&a * &a).sum(Kind::Float).backward();
        opt.step().unwrap();
        assert!(b.equal(&b_after), "a parameter without a gradient moved");
        // a: g₁ = (2, 4) → a₁ = (0.8, 1.6); g₂ = (1.6, 3.2), buf = 0.9·(2, 4) + g₂ = (3.4, 6.8) → a₂ = (0.46, 0.92).
        assert!(a.allclose(&Tensor::from_slice(&[0.46f32, 0.92]), 1e-6, 1e-6, false), "{a:?}");
    }

    #[test]
    fn state_round_trips() {
        let cfg = OptimizerConfig::Adam(Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let w = Tensor::from_slice(&[3.0f64, 4.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]);
        (&w * &w).sum(Kind::Double).backward();
        opt.step().unwrap();
        let saved: Vec<(String, Tensor)> = opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
        assert_eq!(saved.len(), 2);
        let mut other = Optimizer::new(&cfg, vec![("w".into(), w.shallow_clone())]);
        other.load_state(opt.steps, &saved).unwrap();
        assert_eq!(other.steps, 1);
        assert!(other.state_tensors()[1].1.equal(&saved[1].1));
    }
}
