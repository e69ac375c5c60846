//! `mixup.selective`: selective mixup (Teney et al., ICML 2024; paper-only, no reference
//! code).
//!
//! Each example i is mixed with a partner j drawn uniformly from the examples of the batch
//! that satisfy a criterion relative to i: same or different class, same or different domain,
//! or a combination (e.g. LISA's same class, different domain). Then, as mixup,
//! λ ~ Beta(α, α) per batch, x̃ = λx + (1−λ)x_j and targets λ·onehot(y) + (1−λ)·onehot(y_j).
//! Partners come from the batch (the paper's "from the batch when the batch is large"); an
//! example with no admissible partner in its batch is its own partner (left unmixed). Domains
//! are the data's domain ids (the spurious generator's attribute).
//!
//! The paper's point is that selecting partners resamples the training distribution: the
//! partners' marginal differs from the anchors'. Its two controls are `mixup.selective_no_mix`
//! (the same pairs, unmixed) and `mixup.resample` (plain class/domain-balanced resampling).
//! Randomness only from the host's stream; stateless.

use crate::mixup::mix;
use serde::Deserialize;
use xlab_plugin_api::tch::Tensor;
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    param, Batch, BatchTransform, Component, ComponentKind, HostRng, ParamSpec, ParamType, PluginError, Result,
    RunInfo, Transformed,
};

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SelectiveParams {
    /// λ ~ Beta(α, α); α ≤ 0: λ = 1 (no mixing)
    #[param(default = 1.0)]
    pub alpha: f64,
    /// the partner's class: `same`, `different` or `any`
    #[param(default = "different", choices = ["same", "different", "any"])]
    pub class: String,
    /// the partner's domain: `same`, `different` or `any`
    #[param(default = "any", choices = ["same", "different", "any"])]
    pub domain: String,
}

/// The partner criterion: for class and for domain, `same`, `different` or `any`.
#[derive(Debug, Clone)]
pub struct Criterion {
    pub class: String,
    pub domain: String,
}

impl Criterion {
    pub fn params(class_default: &str, domain_default: &str) -> Vec<ParamSpec> {
        let choice = |name: &str, default: &str, doc: &str| {
            let mut p = param(name, ParamType::String, default, doc);
            p.choices = vec!["same".into(), "different".into(), "any".into()];
            p
        };
        vec![
            choice("class", class_default, "the partner's class: `same`, `different` or `any`"),
            choice("domain", domain_default, "the partner's domain: `same`, `different` or `any`"),
        ]
    }

    pub fn new(id: &str, class: &str, domain: &str) -> Result<Self> {
        for (k, v) in [("class", class), ("domain", domain)] {
            if !["same", "different", "any"].contains(&v) {
                return Err(PluginError(format!("{id}: `{k}` is `same`, `different` or `any`, got `{v}`")));
            }
        }
        if class == "any" && domain == "any" {
            return Err(PluginError(format!(
                "{id}: with `class: any` and `domain: any` this is plain mixup; use mixup.mixup"
            )));
        }
        Ok(Criterion { class: class.into(), domain: domain.into() })
    }

    /// Checks that the data has what the criterion compares.
    pub fn setup(&self, id: &str, info: &RunInfo) -> Result<()> {
        if self.domain != "any" && info.train_domains.is_empty() {
            return Err(PluginError(format!(
                "{id} with `domain: {}` needs data with domains (e.g. `data: {{name: spurious}}`)",
                self.domain
            )));
        }
        Ok(())
    }

    fn admits(rule: &str, a: i64, b: i64) -> bool {
        match rule {
            "same" => a == b,
            "different" => a != b,
            _ => true,
        }
    }

    /// For each example, a partner drawn uniformly among the others in the batch that satisfy
    /// the criterion (itself when there is none).
    pub fn partners(&self, y: &[i64], domain: Option<&[i64]>, rng: &mut HostRng<'_>) -> Vec<i64> {
        (0..y.len())
            .map(|i| {
                let ok: Vec<usize> = (0..y.len())
                    .filter(|&j| {
                        j != i
                            && Self::admits(&self.class, y[i], y[j])
                            && domain.is_none_or(|d| Self::admits(&self.domain, d[i], d[j]))
                    })
                    .collect();
                if ok.is_empty() {
                    i as i64
                } else {
                    ok[rng.below(ok.len() as u64) as usize] as i64
                }
            })
            .collect()
    }

    /// The batch's labels and domains as vectors.
    pub fn read(&self, id: &str, batch: &Batch) -> Result<(Vec<i64>, Option<Vec<i64>>)> {
        let y = Vec::<i64>::try_from(&batch.y)?;
        let d = match (&batch.domain, self.domain.as_str()) {
            (_, "any") => None,
            (Some(d), _) => Some(Vec::<i64>::try_from(d)?),
            (None, _) => return Err(PluginError(format!("{id}: the batch has no domain ids"))),
        };
        Ok((y, d))
    }
}

pub struct Selective {
    alpha: f64,
    criterion: Criterion,
}

impl Component for Selective {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.selective";
    const SUMMARY: &'static str = "selective mixup: mix each example with a partner chosen by class and domain";
    const REFERENCE: &'static str = "Teney et al., Selective Mixup Helps with Distribution Shifts, But Not (Only) because of Mixup, ICML 2024 (paper only)";
    const RANDOM: bool = true;
    type Params = SelectiveParams;

    fn new(p: SelectiveParams) -> Result<Self> {
        if !p.alpha.is_finite() {
            return Err(PluginError(format!("alpha must be finite, got {}", p.alpha)));
        }
        Ok(Selective { alpha: p.alpha, criterion: Criterion::new(Self::ID, &p.class, &p.domain)? })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        self.criterion.setup(Self::ID, info)
    }
}

impl BatchTransform for Selective {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let (y, d) = self.criterion.read(Self::ID, &batch)?;
        let lam = if self.alpha > 0.0 { rng.beta(self.alpha, self.alpha) } else { 1.0 };
        let partners = self.criterion.partners(&y, d.as_deref(), rng);
        let (x, target) = mix(&batch.x, &batch.y, lam, &partners, batch.num_classes);
        Ok(Transformed { x, target })
    }
}

/// `mixup.selective_no_mix`: the control that keeps selective mixup's pairs but does not mix
/// them: the batch becomes `[x; x_partner]` with their own labels, so training sees the
/// anchors and the partners as separate examples (the resampling without the mixing).
pub struct SelectiveNoMix {
    criterion: Criterion,
}

#[derive(Debug, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct NoMixParams {
    /// the partner's class: `same`, `different` or `any`
    #[param(default = "different", choices = ["same", "different", "any"])]
    pub class: String,
    /// the partner's domain: `same`, `different` or `any`
    #[param(default = "any", choices = ["same", "different", "any"])]
    pub domain: String,
}

impl Component for SelectiveNoMix {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.selective_no_mix";
    const SUMMARY: &'static str = "selective mixup's control: the selected pairs as separate examples, unmixed";
    const REFERENCE: &'static str = "Teney et al., Selective Mixup Helps with Distribution Shifts, But Not (Only) because of Mixup, ICML 2024 (paper only)";
    const RANDOM: bool = true;
    type Params = NoMixParams;

    fn new(p: NoMixParams) -> Result<Self> {
        Ok(SelectiveNoMix { criterion: Criterion::new(Self::ID, &p.class, &p.domain)? })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        self.criterion.setup(Self::ID, info)
    }
}

impl BatchTransform for SelectiveNoMix {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let (y, d) = self.criterion.read(Self::ID, &batch)?;
        let partners = self.criterion.partners(&y, d.as_deref(), rng);
        let p = Tensor::from_slice(&partners).to_device(batch.x.device());
        let onehot = batch.y.one_hot(batch.num_classes).to_kind(batch.x.kind());
        let x = Tensor::cat(&[batch.x.shallow_clone(), batch.x.index_select(0, &p)], 0);
        let target = Tensor::cat(&[onehot.shallow_clone(), onehot.index_select(0, &p)], 0);
        Ok(Transformed { x, target })
    }
}
