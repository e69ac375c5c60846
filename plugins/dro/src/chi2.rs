//! `dro.chi2`: χ²-divergence DRO of the minibatch losses (Levy, Carmon, Duchi, Sidford,
//! NeurIPS 2020).
//!
//! Reference: daniellevy/fast-dro `robust_losses.py`. Best response (default): p_i =
//! relu(v_i − η)/Σ relu(v_j − η) with η found by bisection so that ½·mean((m p − 1)²) = ρ,
//! computed without gradient; the loss is Σ p_i v_i (minus (reg/2m)‖m p − 1‖² when
//! regularised). Uniform weights when the losses are (relatively) equal; uniform over the
//! argmax when m ≤ 1 + 2ρ. Dual (`dual: true`): loss = η + √(1+2ρ)·√mean(relu(v − η)²), with
//! η learned jointly (see `robust::Eta`).

use crate::cvar::shared_params;
use crate::robust::{self, Core};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::{
    param, Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, ParamSpec, ParamType, PluginError,
    Result, State,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chi2Params {
    pub rho: f64,
    pub reg: f64,
    pub dual: bool,
    pub eta_init: f64,
    pub eta_lr: f64,
    pub tol: f64,
    pub max_iter: u32,
}

pub struct Chi2 {
    rho: f64,
    core: Core,
}

impl Component for Chi2 {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.chi2";
    const SUMMARY: &'static str = "χ² DRO: the worst reweighting of the minibatch within χ²-divergence ρ";
    const REFERENCE: &'static str =
        "Levy et al., Large-Scale Methods for Distributionally Robust Optimization, NeurIPS 2020; daniellevy/fast-dro robust_losses.py";
    const STATEFUL: bool = true;
    type Params = Chi2Params;

    fn params() -> Vec<ParamSpec> {
        let mut rho = param("rho", ParamType::Float, 1.0, "the uncertainty set's size ρ (χ² divergence)");
        rho.min = Some(1e-9);
        std::iter::once(rho).chain(shared_params()).collect()
    }

    fn new(p: Chi2Params) -> Result<Self> {
        if !(p.rho > 0.0 && p.rho.is_finite()) {
            return Err(PluginError(format!("dro.chi2: rho must be positive and finite, got {}", p.rho)));
        }
        let core = Core::new(Self::ID, p.reg, p.dual, p.eta_init, p.eta_lr, p.tol, p.max_iter)?;
        Ok(Chi2 { rho: p.rho, core })
    }

    fn save_state(&self) -> Result<State> {
        self.core.save()
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.core.load(state)
    }
}

impl Objective for Chi2 {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let (rho, reg, tol, max_iter) = (self.rho, self.core.reg, self.core.tol, self.core.max_iter);
        self.core.loss(
            &input,
            ctx,
            |v, e| {
                let r = (v - e).relu();
                e + (1.0 + 2.0 * rho).sqrt() * (&r * &r).mean(v.kind()).sqrt()
            },
            |values| {
                let p = robust::chi2_weights(values, rho, reg, tol, max_iter);
                let penalty = if reg > 0.0 { robust::chi2_penalty(&p, reg) } else { 0.0 };
                (p, penalty)
            },
        )
    }
}
