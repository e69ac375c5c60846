//! `diffusion.unipc`: UniPC (Zhao et al., NeurIPS 2023), a unified predictor-corrector
//! multistep solver in data prediction, with the B(h) variants bh1 and bh2.
//!
//! Reference: huggingface/diffusers `scheduling_unipc_multistep.py` with its defaults
//! (`solver_order=2`, `predict_x0=True`, `solver_type="bh2"`, `lower_order_final=True`,
//! `disable_corrector=[]`, `final_sigmas_type="zero"`, `timestep_spacing="linspace"`).
//! Timesteps and σ's as DPM-Solver++ (`dpmpp_2m::dpm_schedule`, Karras σ's included); the
//! model output becomes the data prediction m_k = (x − s_k·ε̂)/α_k, with α = 1/√(σ²+1),
//! s = σα, λ = log α − log s.
//! - Order of the predictor at step k of N: min(solver_order, N − k, k + 1) (the warm-up, and
//!   `lower_order_final` lowering the last steps); always 1 on a step to σ = 0, where a
//!   higher order has no finite update.
//! - Coefficients for order p with h = λ_next − λ_cur, hh = −h, B(h) = hh (bh1) or e^{hh} − 1
//!   (bh2): r_i = (λ of the i-th older output − λ_cur)/h for i < p, then r_p = 1; rows
//!   R_j = (r^{j−1}) and b_j = φ_j(hh)·j!/B(h) with φ₁ = (e^{hh} − 1)/hh − 1 and
//!   φ_{j+1} = φ_j/hh − 1/(j+1)!.
//! - UniP (predictor): D_i = (m_{k−i} − m_k)/r_i, ρ = ½ for p = 2, else R⁻¹b over the first
//!   p − 1 rows; x' = (s'/s)·x − α'(e^{hh} − 1)·m_k − α'·B(h)·Σρ_i D_i.
//! - UniC (corrector), at every step after the first, once the model has been evaluated at
//!   the predicted point (no extra evaluation): with the previous step's order p, its start
//!   x_prev and output m_{k−1}, and the new output m_k: ρ = ½ for p = 1, else R⁻¹b;
//!   x_k = (s_k/s_{k−1})·x_prev − α_k(e^{hh} − 1)·m_{k−1} − α_k·B(h)·(Σ_{i<p} ρ_i D_i + ρ_p(m_k − m_{k−1})).
//!
//! NFE = N. Deterministic; the history lives within one call. Stateless.

use crate::common::{alphas_cumprod, check_steps};
use crate::dpmpp_2m::{dpm_schedule, vp};
use crate::timesteps::Spacing;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::{Component, ComponentKind, DenoiserCtx, HostRng, Params, PluginError, Result, Sampler};

/// The B(h) function of UniPC.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    Bh1,
    Bh2,
}

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct UnipcParams {
    /// number of inference steps N (one evaluation each)
    #[param(default = 20, min = 1.0)]
    pub steps: i64,
    /// the predictor's order p (the corrector raises the accuracy to p + 1)
    #[param(default = 2, min = 1.0, max = 3.0)]
    pub solver_order: i64,
    /// B(h) = h (bh1) or e^h − 1 (bh2, recommended for guided sampling)
    #[param(default = "bh2", choices = ["bh1", "bh2"])]
    pub solver_type: SolverType,
    /// lower the order on the last steps
    #[param(default = true)]
    pub lower_order_final: bool,
    /// linspace, leading or trailing timesteps
    #[param(default = "linspace", choices = ["leading", "trailing", "linspace"])]
    pub timestep_spacing: Spacing,
    /// added to every leading timestep
    #[param(default = 0)]
    pub steps_offset: i64,
    /// Karras et al.'s σ spacing (ρ = 7) over the whole training range; the model is called at
    /// each σ's rounded timestep
    #[param(default = false)]
    pub use_karras_sigmas: bool,
}

pub struct Unipc {
    p: UnipcParams,
}

/// Solves the small system a·x = b (Gaussian elimination with partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// The coefficients of one update of order `p`: e^{hh} − 1, B(h), and ρ (of length p − 1 for
/// the predictor, p for the corrector). `rks` are the r_i of the older outputs (p − 1 of them).
pub fn coefficients(h: f64, rks: &[f64], kind: SolverType, corrector: bool) -> (f64, f64, Vec<f64>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = match kind {
        SolverType::Bh1 => hh,
        SolverType::Bh2 => hh.exp_m1(),
    };
    let p = rks.len() + 1;
    let rhos = match (p, corrector) {
        (1, false) => vec![],
        (1, true) => vec![0.5],
        (2, false) => vec![0.5],
        _ => {
            let mut r: Vec<f64> = rks.to_vec();
            r.push(1.0);
            let mut b = Vec::new();
            let mut h_phi_k = h_phi_1 / hh - 1.0;
            let mut factorial = 1.0;
            for i in 1..=p {
                b.push(h_phi_k * factorial / b_h);
                factorial *= (i + 1) as f64;
                h_phi_k = h_phi_k / hh - 1.0 / factorial;
            }
            let m = if corrector { p } else { p - 1 };
            let rows: Vec<Vec<f64>> = (0..m).map(|j| r[..m].iter().map(|rk| rk.powi(j as i32)).collect()).collect();
            solve(rows, b[..m].to_vec())
        }
    };
    (h_phi_1, b_h, rhos)
}

/// Σ ρ_i·(m_older_i − m0)/r_i over the older outputs.
fn weighted_differences(rhos: &[f64], rks: &[f64], older: &[&Tensor], m0: &Tensor) -> Option<Tensor> {
    older.iter().zip(rks).zip(rhos).map(|((m, r), rho)| (*m - m0) / *r * *rho).reduce(|a, b| a + b)
}

impl Component for Unipc {
    const KIND: ComponentKind = ComponentKind::Sampler;
    const ID: &'static str = "diffusion.unipc";
    const SUMMARY: &'static str =
        "UniPC: a predictor-corrector multistep solver (the corrector reuses the next evaluation, NFE = N)";
    const REFERENCE: &'static str = "Zhao et al., UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models, NeurIPS 2023; huggingface/diffusers scheduling_unipc_multistep.py";
    type Params = UnipcParams;

    fn new(p: UnipcParams) -> Result<Self> {
        check_steps(p.steps)?;
        if !(1..=3).contains(&p.solver_order) {
            return Err(PluginError(format!("solver_order must be 1, 2 or 3, got {}", p.solver_order)));
        }
        Ok(Unipc { p })
    }
}

impl Sampler for Unipc {
    fn sample(&mut self, noise: Tensor, den: &mut DenoiserCtx<'_>, _rng: &mut HostRng<'_>) -> Result<Tensor> {
        let p = &self.p;
        let ac = alphas_cumprod(den)?;
        let n = p.steps as usize;
        let (ts, sigmas) = dpm_schedule(&ac, n, p.timestep_spacing, p.steps_offset, p.use_karras_sigmas)?;
        let lambda = |i: usize| vp(sigmas[i]).2;
        let mut x = noise;
        // Data predictions m_0..m_k, and the previous step's start and order.
        let mut outputs: Vec<Tensor> = Vec::new();
        let mut last: Option<(Tensor, usize)> = None;
        for (k, &t) in ts.iter().enumerate() {
            let (alpha, s, _) = vp(sigmas[k]);
            let eps = den.eps(&x, t)?;
            let m = (&x - eps * s) / alpha;
            if let Some((x_prev, order)) = last.take() {
                // UniC: correct x_k with the output just computed there.
                let m0 = &outputs[k - 1];
                let h = lambda(k) - lambda(k - 1);
                let rks: Vec<f64> = (1..order).map(|i| (lambda(k - 1 - i) - lambda(k - 1)) / h).collect();
                let older: Vec<&Tensor> = (1..order).map(|i| &outputs[k - 1 - i]).collect();
                let (h_phi_1, b_h, rhos) = coefficients(h, &rks, p.solver_type, true);
                let (a_k, s_k, _) = vp(sigmas[k]);
                let (_, s_prev, _) = vp(sigmas[k - 1]);
                let mut res = (&m - m0) * rhos[order - 1];
                if let Some(d) = weighted_differences(&rhos[..order - 1], &rks, &older, m0) {
                    res += d;
                }
                x = x_prev * (s_k / s_prev) - m0 * (a_k * h_phi_1) - res * (a_k * b_h);
            }
            outputs.push(m);
            // UniP from σ_k to σ_{k+1}.
            let max_order =
                if p.lower_order_final { (p.solver_order as usize).min(n - k) } else { p.solver_order as usize };
            let order = if sigmas[k + 1] == 0.0 { 1 } else { max_order.min(k + 1) };
            let m0 = &outputs[k];
            let h = lambda(k + 1) - lambda(k);
            let (a_n, s_n, _) = vp(sigmas[k + 1]);
            let rks: Vec<f64> = (1..order).map(|i| (lambda(k - i) - lambda(k)) / h).collect();
            let older: Vec<&Tensor> = (1..order).map(|i| &outputs[k - i]).collect();
            let (h_phi_1, b_h, rhos) = coefficients(h, &rks, p.solver_type, false);
            let mut next = &x * (s_n / s) - m0 * (a_n * h_phi_1);
            if let Some(d) = weighted_differences(&rhos, &rks, &older, m0) {
                next -= d * (a_n * b_h);
            }
            last = Some((x, order));
            x = next;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linear_solve() {
        let x = solve(vec![vec![0.0, 2.0], vec![1.0, 1.0]], vec![4.0, 3.0]);
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12, "{x:?}");
    }

    /// The corrector of order 1 with bh2 is the trapezoid of the exponential integrator:
    /// ρ = ½; and order 2's predictor uses ρ = ½ without solving.
    #[test]
    fn low_order_coefficients() {
        let (phi, bh, rhos) = coefficients(0.7, &[], SolverType::Bh2, true);
        assert_eq!(rhos, vec![0.5]);
        assert!((phi - (-0.7f64).exp_m1()).abs() < 1e-15 && phi == bh);
        assert_eq!(coefficients(0.7, &[-1.2], SolverType::Bh2, false).2, vec![0.5]);
        assert_eq!(coefficients(0.7, &[], SolverType::Bh1, false).1, -0.7);
    }
}
