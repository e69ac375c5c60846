//! DualFast (Yu et al., arXiv 2506.13058, 2025; docs/methods.md §3.9), a zero-NFE correction of
//! the denoiser's ε̂ that `diffusion.ddim`, `diffusion.dpmpp_2m` and `diffusion.dpmpp_2m_sde`
//! apply when `dualfast_c_max` > 0.
//!
//! The approximation error of ε_θ is smaller at larger t, so at step i (timestep t_i) the
//! prediction is pushed away from a cached one at a larger timestep τ:
//! ε̃_i = ε_i + c_i(ε_i − ε_τ), and the unchanged base solver takes ε̃_i (DPM-Solver++ forms its
//! data prediction, and keeps it in its history, from ε̃_i). No reference code is public; the
//! coefficient schedule and the borrowed timestep could not be read from the paper, so they are
//! parameters: `dualfast_schedule` `linear_index` (c_i = c_max·i/(N−1), the default) or
//! `linear_time` (c_i = c_max(1 − t_i/T)); `dualfast_tau` `first` (ε of the first step, the
//! default) or `prev` (the previous step's ε). The cached ε is the model's own (guided, with a
//! guidance), not a corrected one. `dualfast_c_max: 0` (the default) is the base sampler, bit
//! for bit. NFE unchanged.

use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;

/// How the correction's weight grows over the run.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CoefficientSchedule {
    /// c_i = c_max·i/(N−1).
    #[default]
    LinearIndex,
    /// c_i = c_max(1 − t_i/T).
    LinearTime,
}

/// Which earlier prediction the correction leans away from.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Tau {
    /// The first sampling step's ε.
    #[default]
    First,
    /// The previous step's ε.
    Prev,
}

/// The correction over one sampling run of `steps` steps on `t_total` training timesteps.
pub struct Dualfast {
    c_max: f64,
    schedule: CoefficientSchedule,
    tau: Tau,
    steps: usize,
    t_total: usize,
    cached: Option<Tensor>,
}

impl Dualfast {
    pub fn new(c_max: f64, schedule: CoefficientSchedule, tau: Tau, steps: usize, t_total: usize) -> Self {
        Dualfast { c_max, schedule, tau, steps, t_total, cached: None }
    }

    /// c_i at step `i` (timestep `t`).
    pub fn coefficient(&self, i: usize, t: f64) -> f64 {
        match self.schedule {
            CoefficientSchedule::LinearIndex if self.steps > 1 => self.c_max * i as f64 / (self.steps - 1) as f64,
            CoefficientSchedule::LinearIndex => 0.0,
            CoefficientSchedule::LinearTime => self.c_max * (1.0 - t / self.t_total as f64),
        }
    }

    /// ε̃ for the model's ε at step `i` (timestep `t`); ε itself when c_max is 0. The first step
    /// has no earlier prediction: ε_τ is its own, and ε̃ = ε.
    pub fn correct(&mut self, i: usize, t: f64, eps: Tensor) -> Tensor {
        if self.c_max == 0.0 {
            return eps;
        }
        let c = self.coefficient(i, t);
        let out = match &self.cached {
            Some(tau) => &eps + (&eps - tau) * c,
            None => eps.shallow_clone(),
        };
        if self.tau == Tau::Prev || self.cached.is_none() {
            self.cached = Some(eps);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: f64) -> Tensor {
        Tensor::from_slice(&[v])
    }

    #[test]
    fn coefficients_and_the_borrowed_prediction() {
        let d = Dualfast::new(0.5, CoefficientSchedule::LinearIndex, Tau::First, 5, 1000);
        assert_eq!((d.coefficient(0, 800.0), d.coefficient(2, 400.0), d.coefficient(4, 0.0)), (0.0, 0.25, 0.5));
        let d = Dualfast::new(0.5, CoefficientSchedule::LinearTime, Tau::First, 5, 1000);
        assert!((d.coefficient(0, 800.0) - 0.1).abs() < 1e-15 && d.coefficient(4, 0.0) == 0.5);
        // tau first: every later step leans away from step 0's ε; prev: from the step before.
        let mut first = Dualfast::new(1.0, CoefficientSchedule::LinearIndex, Tau::First, 3, 1000);
        let mut prev = Dualfast::new(1.0, CoefficientSchedule::LinearIndex, Tau::Prev, 3, 1000);
        let got = |d: &mut Dualfast| -> Vec<f64> {
            [1.0, 2.0, 4.0].iter().enumerate().map(|(i, &e)| f64::try_from(d.correct(i, 0.0, t(e))).unwrap()).collect()
        };
        // c = 0, 0.5, 1: step 1: 2 + 0.5(2 − 1); step 2: 4 + (4 − 1) or 4 + (4 − 2).
        assert_eq!(got(&mut first), vec![1.0, 2.5, 7.0]);
        assert_eq!(got(&mut prev), vec![1.0, 2.5, 6.0]);
    }
}
