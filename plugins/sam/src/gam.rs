//! `sam.gam`: Gradient-norm Aware Minimization (Zhang et al., CVPR 2023), the released
//! accelerated form with a finite-difference Hessian-vector product.
//!
//! Reference: xxgege/GAM `gam/gam.py` (`GAM.step`), defaults of `main_cifar.py` for
//! CIFAR-10/ResNet. With ρ' = `grad_rho`, ρ = `grad_norm_rho`, β2 = 1 − β0, β3 = 1 − β1 and
//! ε = 1e-12:
//! 1. g0 = ∇L(w) (running statistics update; its loss is reported); w1 = w + ρ'g0/(‖g0‖+ε).
//! 2. g1 = ∇L(w1) (statistics frozen from here on); back to w.
//! 3. d = g1 − g0; w2 = w + e12, e12 = ρ d/(‖d‖+ε).
//! 4. g2 = ∇L(w2); w3 = w2 + e', e' = ρ' g2/(‖g2‖+ε).
//! 5. g3 = ∇L(w3).
//! 6. m = g0 + |β2| g2, u = β1 g1 + β3 g3, c = ⟨m,u⟩/(‖u‖‖m‖+ε),
//!    v = m − c‖m‖ u/(‖u‖+ε), G = u − γ v.
//! 7. w = w3 − e12 − e'; the base optimizer steps with G.
//!
//! `adaptive: true` multiplies every perturbation by w² and takes its norm as ‖g⊙|w|‖; the
//! decomposition's norms stay plain. Cost 4F+4B. Stateless (the reference's ρ schedulers are
//! constant: their max and min are equal).

use crate::common::{add_to_weights, global_norm, grads, perturbation, set_grads};
use serde::Deserialize;
use xlab_plugin_api::tch::{Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Param, PluginError, Result, StepCtx, StepRule};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct GamParams {
    /// ρ': radius of the SAM-style perturbations
    #[param(default = 0.03, min = 0.0)]
    pub grad_rho: f64,
    /// ρ: radius of the gradient-norm perturbation
    #[param(default = 0.2, min = 0.0)]
    pub grad_norm_rho: f64,
    /// β0 (only β2 = 1 − β0 enters the update)
    #[param(default = 0.1)]
    pub beta0: f64,
    /// β1 (β3 = 1 − β1)
    #[param(default = 0.1)]
    pub beta1: f64,
    /// γ: weight of the component of m orthogonal to u
    #[param(default = 0.05, min = 0.0)]
    pub gamma: f64,
    /// scale perturbations by w² (adaptive norms)
    #[param(default = false)]
    pub adaptive: bool,
}

pub struct Gam {
    p: GamParams,
}

const EPS: f64 = 1e-12;

fn dot(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        s += f64::try_from((x * y).sum(Kind::Double))?;
    }
    Ok(s)
}

impl Gam {
    /// `radius · dir / (‖dir‖ + ε)`, or its adaptive form.
    fn perturbation(&self, params: &[Param], dir: &[(usize, Tensor)], radius: f64) -> Result<Vec<(usize, Tensor)>> {
        Ok(perturbation(params, dir, radius, EPS, self.p.adaptive)?.0)
    }
}

impl Component for Gam {
    const KIND: ComponentKind = ComponentKind::StepRule;
    const ID: &'static str = "sam.gam";
    const SUMMARY: &'static str =
        "Gradient-norm Aware Minimization: also flattens the gradient norm, with a finite-difference Hessian product";
    const REFERENCE: &'static str = "Zhang et al., Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves Generalization, CVPR 2023; xxgege/GAM gam/gam.py";
    const PASSES_PER_STEP: u32 = 4;
    type Params = GamParams;

    fn new(p: GamParams) -> Result<Self> {
        for (name, v) in [("grad_rho", p.grad_rho), ("grad_norm_rho", p.grad_norm_rho), ("gamma", p.gamma)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(PluginError(format!("{name} must be a finite number ≥ 0, got {v}")));
            }
        }
        Ok(Gam { p })
    }
}

impl StepRule for Gam {
    fn step(&mut self, host: &mut StepCtx<'_>) -> Result<()> {
        host.forward_backward()?;
        let mut params = host.params()?;
        let g0 = grads(&params);
        let e0 = self.perturbation(&params, &g0, self.p.grad_rho)?;
        add_to_weights(&mut params, &e0, 1.0)?;
        host.freeze_norm_stats(true);
        let result = (|| -> Result<()> {
            host.forward_backward()?;
            let g1 = grads(&params);
            add_to_weights(&mut params, &e0, -1.0)?;
            let d: Vec<(usize, Tensor)> = g1.iter().zip(&g0).map(|((i, a), (_, b))| (*i, a - b)).collect();
            let e12 = self.perturbation(&params, &d, self.p.grad_norm_rho)?;
            add_to_weights(&mut params, &e12, 1.0)?;
            host.forward_backward()?;
            let g2 = grads(&params);
            let e_prime = self.perturbation(&params, &g2, self.p.grad_rho)?;
            add_to_weights(&mut params, &e_prime, 1.0)?;
            let third = host.forward_backward();
            add_to_weights(&mut params, &e12, -1.0)?;
            add_to_weights(&mut params, &e_prime, -1.0)?;
            third?;
            let g3 = grads(&params);
            let (beta2, beta3) = ((1.0 - self.p.beta0).abs(), 1.0 - self.p.beta1);
            let m: Vec<Tensor> = g0.iter().zip(&g2).map(|((_, a), (_, b))| a + b * beta2).collect();
            let u: Vec<Tensor> = g1.iter().zip(&g3).map(|((_, a), (_, b))| a * self.p.beta1 + b * beta3).collect();
            let (nm, nu) = (global_norm(&m)?, global_norm(&u)?);
            let c = dot(&m, &u)? / (nu * nm + EPS);
            let k = c * nm / (nu + EPS);
            let update: Vec<(usize, Tensor)> = g0
                .iter()
                .zip(m.iter().zip(&u))
                .map(|((i, _), (m, u))| {
                    let v = m - u * k;
                    (*i, u - v * self.p.gamma)
                })
                .collect();
            host.log("gam.cosine", c);
            set_grads(&params, &update)
        })();
        host.freeze_norm_stats(false);
        result?;
        host.optimizer_step()
    }
}
