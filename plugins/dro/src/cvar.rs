//! `dro.cvar`: CVaR_α of the minibatch losses (Levy, Carmon, Duchi, Sidford, NeurIPS 2020).
//!
//! Reference: daniellevy/fast-dro `robust_losses.py`. Best response (default): the weights p
//! are computed without gradient from the per-example losses v (the ⌊αm⌋ largest get 1/(αm),
//! the next one the remainder; KL-regularised with `reg > 0`), and the loss is Σ p_i v_i
//! (minus the KL penalty when regularised). Dual (`dual: true`): loss = η + mean(relu(v − η))/α
//! with η learned jointly (see `robust::Eta`). α = 1 is ERM.

use crate::robust::{self, Core};
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    param, Component, ComponentKind, Objective, ObjectiveCtx, ObjectiveInput, ParamSpec, ParamType, PluginError,
    Result, State,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CvarParams {
    /// the fraction α of worst losses averaged (1: ERM)
    #[param(default = 0.1, min = 1e-09, max = 1.0)]
    pub alpha: f64,
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

pub struct Cvar {
    alpha: f64,
    core: Core,
}

/// The parameters `dro.cvar` and `dro.chi2` share, after their own size parameter.
pub fn shared_params() -> Vec<ParamSpec> {
    let ranged = |mut p: ParamSpec, min: f64| {
        p.min = Some(min);
        p
    };
    vec![
        ranged(param("reg", ParamType::Float, 0.0, "regularisation of the best response (0: none)"), 0.0),
        param("dual", ParamType::Bool, false, "use the dual form with a learned η instead of the best response"),
        param("eta_init", ParamType::Float, 0.0, "dual form: the initial η"),
        ranged(param("eta_lr", ParamType::Float, 0.01, "dual form: SGD step size of η"), 0.0),
        ranged(param("tol", ParamType::Float, 1e-4, "bisection tolerance on the constraint"), 0.0),
        ranged(param("max_iter", ParamType::Int, 1000, "bisection iterations at most"), 1.0),
    ]
}

impl Component for Cvar {
    const KIND: ComponentKind = ComponentKind::Objective;
    const ID: &'static str = "dro.cvar";
    const SUMMARY: &'static str = "CVaR DRO: the mean of the worst α-fraction of the minibatch losses";
    const REFERENCE: &'static str =
        "Levy et al., Large-Scale Methods for Distributionally Robust Optimization, NeurIPS 2020; daniellevy/fast-dro robust_losses.py";
    const STATEFUL: bool = true;
    type Params = CvarParams;

    fn new(p: CvarParams) -> Result<Self> {
        if !(p.alpha > 0.0 && p.alpha <= 1.0) {
            return Err(PluginError(format!("dro.cvar: alpha must be in (0, 1], got {}", p.alpha)));
        }
        let core = Core::new(Self::ID, p.reg, p.dual, p.eta_init, p.eta_lr, p.tol, p.max_iter)?;
        Ok(Cvar { alpha: p.alpha, core })
    }

    fn save_state(&self) -> Result<State> {
        self.core.save()
    }

    fn load_state(&mut self, state: State) -> Result<()> {
        self.core.load(state)
    }
}

impl Objective for Cvar {
    fn loss(&mut self, input: ObjectiveInput, ctx: &mut ObjectiveCtx<'_>) -> Result<Tensor> {
        let (alpha, reg, tol, max_iter) = (self.alpha, self.core.reg, self.core.tol, self.core.max_iter);
        self.core.loss(
            &input,
            ctx,
            |v, e| e + (v - e).relu().mean(v.kind()) / alpha,
            |values| {
                let p = robust::cvar_weights(values, alpha, reg, tol, max_iter);
                let penalty = robust::cvar_penalty(&p, reg);
                (p, penalty)
            },
        )
    }
}
