//! `dro.chi2`: χ²-divergence DRO of the minibatch losses (Levy, Carmon, Duchi, Sidford,
//! NeurIPS 2020).
//!
//! Reference: daniellevy/fast-dro `robust_losses.py`. Best response (default): p_i =
//! relu(v_i − η)/Σ relu(v_j − η) with η found by bisection so that ½·mean((m p − 1)²) = ρ,
//! computed without gradient; the loss is Σ p_i v_i (minus (reg/2m)‖m p − 1‖² when
//! regularised). Uniform weights when the losses are (relatively) equal; uniform over the
//! argmax when m ≤ 1 + 2ρ. Dual (`dual: true`): loss = η + √(1+2ρ)·√mean(relu(v − η)²), with
//! η learned jointly (see `robust::Eta`).

use crate::robust::{self, Core};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, PluginError, Result, State};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct Chi2Params {
    /// the uncertainty set's size ρ (χ² divergence)
    #[param(default = 1.0, min = 1e-09)]
    pub rho: f64,
    /// regularisation of the best response (0: none)
    #[param(default = 0.0, min = 0.0)]
    pub reg: f64,
    /// use the dual form with a learned η instead of the best response
    #[param(default = false)]
    pub dual: bool,
    /// dual form: the initial η
    #[param(default = 0.0)]
    pub eta_init: f64,
    /// dual form: SGD step size of η
    #[param(default = 0.01, min = 0.0)]
    pub eta_lr: f64,
    /// bisection tolerance on the constraint
    #[param(default = 0.0001, min = 0.0)]
    pub tol: f64,
    /// bisection iterations at most
    #[param(default = 1000, min = 1.0)]
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
