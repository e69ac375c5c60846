//! The minibatch robust losses of `daniellevy/fast-dro` (`robust_losses.py`), shared by
//! `dro.cvar` and `dro.chi2`: best-response weights by bisection, the values they give, and the
//! learnable η of the dual forms.
//!
//! Everything here runs in f64 on the detached per-example losses; only `Σ p_i v_i` (and the
//! dual's expression) is formed on the tensor, so the gradient flows through v alone.

use serde::{Deserialize, Serialize};
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::{ObjectiveCtx, ObjectiveInput, PluginError, Result};

/// Below this relative spread of the losses, χ² weights are uniform (the reference's
/// `MIN_REL_DIFFERENCE`).
const MIN_REL_DIFFERENCE: f64 = 1e-5;

/// The reference's bisection: widen `[lo, hi]` until `f(lo) ≤ 0 ≤ f(hi)`, then halve until
/// `|f(η)| ≤ tol` or `max_iter` halvings; returns the midpoint then.
pub fn bisection(mut lo: f64, mut hi: f64, f: impl Fn(f64) -> f64, tol: f64, max_iter: u32) -> f64 {
    let (mut flo, mut fhi) = (f(lo), f(hi));
    let mut widen = 0;
    while (flo > 0.0 || fhi < 0.0) && widen < 200 {
        let length = hi - lo;
        if flo > 0.0 {
            hi = lo;
            lo -= 2.0 * length;
        }
        if fhi < 0.0 {
            lo = hi;
            hi += 2.0 * length;
        }
        flo = f(lo);
        fhi = f(hi);
        widen += 1;
    }
    for _ in 0..max_iter {
        let eta = 0.5 * (lo + hi);
        let v = f(eta);
        if v.abs() <= tol {
            return eta;
        }
        if v > 0.0 {
            hi = eta;
        } else if v < 0.0 {
            lo = eta;
        }
    }
    0.5 * (lo + hi)
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn min_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// CVaR_α best response (`geometry='cvar'`). With `reg = 0`: the ⌊αm⌋ largest losses get
/// 1/(αm) each and the next one the remainder. With `reg > 0` (KL-regularised):
/// p_i = min(e^{(v_i−η)/reg}, 1/α)/m with η by bisection so that Σp = 1.
pub fn cvar_weights(v: &[f64], alpha: f64, reg: f64, tol: f64, max_iter: u32) -> Vec<f64> {
    let m = v.len() as f64;
    if reg > 0.0 {
        if alpha >= 1.0 {
            return vec![1.0 / m; v.len()];
        }
        let p = |eta: f64| -> Vec<f64> { v.iter().map(|x| ((x - eta) / reg).exp().min(1.0 / alpha) / m).collect() };
        let target = |eta: f64| 1.0 - p(eta).iter().sum::<f64>();
        // reg · logsumexp(v/reg − log m)
        let z: Vec<f64> = v.iter().map(|x| x / reg - m.ln()).collect();
        let zmax = max_of(&z);
        let eta_min = reg * (zmax + z.iter().map(|x| (x - zmax).exp()).sum::<f64>().ln());
        let eta_max = max_of(v);
        if target(eta_min).abs() <= tol {
            return p(eta_min);
        }
        return p(bisection(eta_min, eta_max, target, tol, max_iter));
    }
    let cutoff = (alpha * m).floor() as usize;
    let surplus = 1.0 - cutoff as f64 / (alpha * m);
    let mut order: Vec<usize> = (0..v.len()).collect();
    // Descending; ties keep index order (a stable sort).
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    let mut p = vec![0.0; v.len()];
    for &i in order.iter().take(cutoff) {
        p[i] = 1.0 / (alpha * m);
    }
    if cutoff < v.len() {
        p[order[cutoff]] = surplus;
    }
    p
}

/// The KL penalty the regularised CVaR value subtracts: reg · (log m + Σ_{p>0} p log p).
pub fn cvar_penalty(p: &[f64], reg: f64) -> f64 {
    if reg == 0.0 {
        return 0.0;
    }
    reg * ((p.len() as f64).ln() + p.iter().filter(|x| **x > 0.0).map(|x| x * x.ln()).sum::<f64>())
}

/// χ² best response of size ρ (`geometry='chi-square'`). With `reg = 0`:
/// p_i = relu(v_i−η)/Σ relu(v_j−η) with η such that ½·mean((m p − 1)²) = ρ. With `reg > 0`:
/// p_i = relu(v_i−η)/(m·max(reg, ‖relu(v−η)‖/√(m(1+2ρ)))) with η such that Σp = 1.
pub fn chi2_weights(v: &[f64], rho: f64, reg: f64, tol: f64, max_iter: u32) -> Vec<f64> {
    let m = v.len() as f64;
    let (vmax, vmin) = (max_of(v), min_of(v));
    if (vmax - vmin) / vmax <= MIN_REL_DIFFERENCE {
        return vec![1.0 / m; v.len()];
    }
    if m <= 1.0 + 2.0 * rho {
        let top = v.iter().filter(|x| **x == vmax).count() as f64;
        return v.iter().map(|x| if *x == vmax { 1.0 / top } else { 0.0 }).collect();
    }
    let relu = |eta: f64| -> Vec<f64> { v.iter().map(|x| (x - eta).max(0.0)).collect() };
    if reg == 0.0 {
        let p = |eta: f64| -> Vec<f64> {
            let r = relu(eta);
            let s: f64 = r.iter().sum();
            r.iter().map(|x| x / s).collect()
        };
        let target = |eta: f64| 0.5 * p(eta).iter().map(|x| (m * x - 1.0).powi(2)).sum::<f64>() / m - rho;
        let eta_min = -(1.0 / ((2.0 * rho + 1.0).sqrt() - 1.0)) * vmax;
        p(bisection(eta_min, vmax, target, tol, max_iter))
    } else {
        let p = |eta: f64| -> Vec<f64> {
            let r = relu(eta);
            let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt();
            let lam = reg.max(norm / (m * (1.0 + 2.0 * rho)).sqrt());
            r.iter().map(|x| x / (m * lam)).collect()
        };
        let target = |eta: f64| 1.0 - p(eta).iter().sum::<f64>();
        p(bisection(vmin - 1.0, vmax, target, tol, max_iter))
    }
}

/// The χ² penalty the regularised value subtracts: (reg/2m)·‖m p − 1‖².
pub fn chi2_penalty(p: &[f64], reg: f64) -> f64 {
    let m = p.len() as f64;
    0.5 / m * reg * p.iter().map(|x| (m * x - 1.0).powi(2)).sum::<f64>()
}

/// The detached per-example losses, in f64.
pub fn values(losses: &Tensor) -> Result<Vec<f64>> {
    if losses.dim() != 1 || losses.size()[0] == 0 {
        return Err(PluginError(format!("per-example losses must be a non-empty vector, got {:?}", losses.size())));
    }
    Ok(Vec::<f64>::try_from(losses.detach().to_kind(Kind::Double))?)
}

/// `Σ p_i v_i − penalty`, with the gradient through v only.
pub fn weighted(losses: &Tensor, p: &[f64], penalty: f64) -> Tensor {
    let w = Tensor::from_slice(p).to_kind(losses.kind()).to_device(losses.device());
    (losses * w).sum(losses.kind()) - penalty
}

/// The dual variable η of the dual forms, trained jointly with the model by plain SGD with its
/// own step size. Its gradient comes from the host's backward pass through the loss; the update
/// is applied when the next step's first pass asks for η, which is the value an optimizer
/// stepping η right after the backward pass would have given that pass. With multi-pass step
/// rules the gradient of the step's last pass is the one applied (as for the model).
pub struct Eta {
    pub lr: f64,
    state: EtaState,
    leaf: Option<Tensor>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EtaState {
    pub eta: f64,
    /// The gradient of the last backward pass not yet applied.
    pub pending: Option<f64>,
}

impl Eta {
    pub fn new(init: f64, lr: f64) -> Self {
        Eta { lr, state: EtaState { eta: init, pending: None }, leaf: None }
    }

    fn leaf_grad(&self) -> Result<Option<f64>> {
        match &self.leaf {
            Some(t) if t.grad().defined() => Ok(Some(f64::try_from(t.grad().to_kind(Kind::Double))?)),
            _ => Ok(None),
        }
    }

    /// η as a leaf tensor for this pass's loss; applies the previous step's gradient first.
    pub fn for_pass(&mut self, first_pass: bool, like: &Tensor) -> Result<Tensor> {
        if first_pass {
            let pending = self.state.pending.take();
            if let Some(g) = pending.or(self.leaf_grad()?) {
                self.state.eta -= self.lr * g;
            }
        }
        let t = Tensor::from(self.state.eta).to_kind(like.kind()).to_device(like.device()).set_requires_grad(true);
        self.leaf = Some(t.shallow_clone());
        Ok(t)
    }

    pub fn value(&self) -> f64 {
        self.state.eta
    }

    pub fn save(&self) -> Result<EtaState> {
        let mut s = self.state.clone();
        if s.pending.is_none() {
            s.pending = self.leaf_grad()?;
        }
        Ok(s)
    }

    pub fn load(&mut self, s: EtaState) {
        self.state = s;
        self.leaf = None;
    }
}

/// What `dro.cvar` and `dro.chi2` share: the solver settings and, in the dual form, η.
pub struct Core {
    pub reg: f64,
    pub tol: f64,
    pub max_iter: u32,
    /// Present in the dual form.
    pub eta: Option<Eta>,
}

impl Core {
    pub fn new(id: &str, reg: f64, dual: bool, eta_init: f64, eta_lr: f64, tol: f64, max_iter: u32) -> Result<Self> {
        if dual && reg > 0.0 {
            return Err(PluginError(format!(
                "{id}: the dual form has no regularised variant; set reg: 0 or dual: false"
            )));
        }
        Ok(Core { reg, tol, max_iter, eta: dual.then(|| Eta::new(eta_init, eta_lr)) })
    }

    /// The minibatch loss: in the dual form `dual(v, η)` with the learned η (logged as
    /// `dro.eta`); otherwise Σ p_i v_i − penalty for the best response `(p, penalty) =
    /// respond(v)` over the detached losses (the largest weight logged as `dro.max_weight`).
    pub fn loss(
        &mut self,
        input: &ObjectiveInput,
        ctx: &mut ObjectiveCtx<'_>,
        dual: impl FnOnce(&Tensor, &Tensor) -> Tensor,
        respond: impl FnOnce(&[f64]) -> (Vec<f64>, f64),
    ) -> Result<Tensor> {
        let v = &input.losses;
        if let Some(eta) = &mut self.eta {
            let e = eta.for_pass(input.first_pass, v)?;
            if input.first_pass {
                ctx.log("dro.eta", eta.value());
            }
            return Ok(dual(v, &e));
        }
        let (p, penalty) = respond(&values(v)?);
        if input.first_pass {
            ctx.log("dro.max_weight", p.iter().copied().fold(0.0, f64::max));
        }
        Ok(weighted(v, &p, penalty))
    }

    pub fn save(&self) -> Result<xlab_plugin_api::State> {
        let json = match &self.eta {
            Some(e) => serde_json::to_value(e.save()?)?,
            None => serde_json::Value::Null,
        };
        Ok(xlab_plugin_api::State { json, tensors: Default::default() })
    }

    pub fn load(&mut self, state: xlab_plugin_api::State) -> Result<()> {
        if let Some(e) = &mut self.eta {
            e.load(serde_json::from_value(state.json)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn cvar_vector_of_methods_md() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        let p = cvar_weights(&v, 0.5, 0.0, 1e-4, 1000);
        assert!(close(&p, &[0.0, 0.0, 0.2, 0.4, 0.4], 1e-12), "{p:?}");
        let loss: f64 = p.iter().zip(&v).map(|(a, b)| a * b).sum();
        assert!((loss - 4.2).abs() < 1e-12);
        assert_eq!(cvar_weights(&v, 1.0, 0.0, 1e-4, 1000), vec![0.2; 5]);
    }

    #[test]
    fn chi2_vector_of_methods_md() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        let p = chi2_weights(&v, 0.5, 0.0, 1e-13, 1000);
        assert!(close(&p, &[0.0, 0.0, 0.1507591475, 0.3333333333, 0.5159075192], 1e-9), "{p:?}");
        let loss: f64 = p.iter().zip(&v).map(|(a, b)| a * b).sum();
        assert!((loss - 4.3651483717).abs() < 1e-9, "{loss}");
        // With the reference's tolerance the answer is close, not exact.
        let q = chi2_weights(&v, 0.5, 0.0, 1e-4, 1000);
        assert!(close(&q, &p, 1e-3), "{q:?}");
    }

    #[test]
    fn chi2_degenerate_cases() {
        assert_eq!(chi2_weights(&[2.0, 2.0, 2.0], 0.5, 0.0, 1e-4, 1000), vec![1.0 / 3.0; 3]);
        // m ≤ 1 + 2ρ: uniform over the argmax.
        assert_eq!(chi2_weights(&[1.0, 3.0, 3.0], 1.0, 0.0, 1e-4, 1000), vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn regularised_weights_sum_to_one() {
        let v = [0.3, 1.7, 0.2, 2.5, 0.9, 1.1];
        for p in [cvar_weights(&v, 0.3, 0.5, 1e-10, 1000), chi2_weights(&v, 0.5, 0.5, 1e-10, 1000)] {
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-8, "{p:?}");
            assert!(p.iter().all(|x| *x >= 0.0));
        }
        // The KL cap: no weight above 1/(αm).
        let p = cvar_weights(&v, 0.3, 0.5, 1e-10, 1000);
        assert!(p.iter().all(|x| *x <= 1.0 / (0.3 * 6.0) + 1e-12), "{p:?}");
    }
}
