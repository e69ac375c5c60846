//! `mixup.comixup`: Co-Mixup, saliency-guided joint mixup with supermodular diversity (Kim et
//! al., ICLR 2021).
//!
//! Reference: snu-mllab/Co-Mixup `main.py` (the training step), `mixup.py` (`mixup_process`),
//! `match.py` (`get_onehot_matrix`, `graphcut_wrapper`, `resolve_label`, `mix_input`,
//! `obj_fn`) and `utils.py` (`distance`); defaults are `main.py`'s.
//!
//! Per batch:
//! 1. Saliency. The host runs the model on the clean batch and returns ∂L/∂x with
//!    L = mean CE · 2·clean_lam/C in training mode when clean_lam > 0 (the reference's clean
//!    loss, whose parameter gradient joins the step's update), or L = mean CE in evaluation mode
//!    when clean_lam = 0 (its parameter gradient discarded). s = √(mean over channels of g²).
//! 2. Compatibility. z = 8×8 average pool of s (stride 1); each example's argmax position;
//!    A_dist = pairwise L1 distance of the positions.
//! 3. The batch in partitions of `part` examples. Per partition of n: s pooled to blocks of side
//!    ⌊W / block_num⌋, normalized to sum 1 per example, cost c = −s;
//!    A = (1−ω)·I + ω·A_dist·n/ΣA_dist. With τ = thres·h·w, β' = β/(h·w), γ' = γ/(h·w),
//!    η' = η/(h·w): a prior α ~ Dir(mixup_alpha) adds −η'·log(α + 1e-8) to each input's costs;
//!    the n output labelings start uniformly at random; then `niter` rounds, each re-labeling
//!    every output in turn with the others fixed: the modular bound of the diversity term,
//!    2γ'·[A·p > τ]·A·p (`hard`) or 2γ'·[A·p > τ]·(A·p − τ) (`soft`) with p the other outputs'
//!    label counts, joins the costs and a graph cut on the block grid (smoothness β', gco's α-β
//!    swap, see [`crate::graphcut`]) gives the output's labels. From the second round, an output
//!    that used two inputs may also use a half-half label of them, one that used three or more
//!    the three half-half labels of its three most used (cost: the mean of the two, −5e-4;
//!    smoothness 0.25 to either parent). With `set_resolve`, before the last round an output
//!    whose set of inputs repeats an earlier output's is charged γ' for one of them. A round
//!    that changes the objective by less than 1e-6 (relative) ends the search.
//! 4. Mixing. Each output is Σ_j mask_j ⊙ x_j with the block masks upsampled (nearest) to the
//!    image; its target is the inputs' one-hot labels weighted by their mask area.
//!
//! Randomness, from the host's stream only, in this order: the block count when `block_num` is
//! −1 (2^k, k uniform in 1..4), then per partition the Dirichlet prior (Marsaglia–Tsang gamma
//! draws, normalized) and the random initial labels (output, row, column order).
//!
//! Deviations:
//! - The labeling is computed in float64 on the CPU (the reference computes the costs in float32
//!   where the batch lives); gco's integer conversion of the costs is reproduced exactly.
//! - The reference divides by the sum of the partition's distances and by each example's
//!   saliency sum; where one of these is zero (all salient positions coincide, or a zero
//!   gradient) it produces NaN, and this transform drops the compatibility term or gives the
//!   example zero cost instead.
//! - A partition of one example (a last partition when the batch is not a multiple of `part`)
//!   is returned unmixed; the reference's graph cut refuses one label.
//! - The mixed batch is trained with the host's soft-target cross-entropy, as every mixup
//!   variant here; the reference's script trains with BCE on the softmax.
//!
//! Stateless.

use crate::cutmix::image_shape;
use crate::graphcut::{smooth_int, unary_int, weight_int, Grid};
use serde::Deserialize;
use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::Params;
use xlab_plugin_api::{
    Batch, BatchTransform, Component, ComponentKind, HostRng, PluginError, Result, RunInfo, Transformed,
};

#[derive(Debug, Clone, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CoMixupParams {
    /// blocks per image side (block side ⌊W / block_num⌋); −1 draws 2, 4, 8 or 16 per batch
    #[param(default = 4, min = -1.0)]
    pub block_num: i64,
    /// examples optimized together (the reference's m_part)
    #[param(default = 20, min = 1.0)]
    pub part: i64,
    /// label smoothness β
    #[param(default = 0.32, min = 0.0)]
    pub beta: f64,
    /// supermodular diversity γ
    #[param(default = 1.0, min = 0.0)]
    pub gamma: f64,
    /// diversity threshold τ, as a fraction of the blocks
    #[param(default = 0.83, min = 0.0)]
    pub thres: f64,
    /// `hard` or `soft` thresholding of the diversity penalty
    #[param(default = "hard", choices = ["hard", "soft"])]
    pub thres_type: String,
    /// weight η of the Dirichlet prior
    #[param(default = 0.05, min = 0.0)]
    pub eta: f64,
    /// the Dirichlet prior's concentration (mixup_alpha)
    #[param(default = 2.0, min = 0.0)]
    pub alpha: f64,
    /// weight of the input compatibility (distance of salient positions)
    #[param(default = 0.001, min = 0.0, max = 1.0)]
    pub omega: f64,
    /// penalize outputs that repeat another's set of inputs
    #[param(default = true)]
    pub set_resolve: bool,
    /// rounds of the search
    #[param(default = 4, min = 1.0)]
    pub niter: i64,
    /// clean-loss weight: > 0 adds 2·clean_lam/C · CE(clean batch) to the update (saliency in training
    /// mode); 0 takes saliency in evaluation mode
    #[param(default = 1.0, min = 0.0)]
    pub clean_lam: f64,
}

pub struct CoMixup {
    p: CoMixupParams,
    image: Option<[i64; 3]>,
}

impl Component for CoMixup {
    const KIND: ComponentKind = ComponentKind::BatchTransform;
    const ID: &'static str = "mixup.comixup";
    const SUMMARY: &'static str =
        "Co-Mixup: each output mixes salient blocks of several inputs, the batch's outputs kept diverse by a graph-cut search";
    const REFERENCE: &'static str = "Kim et al., Co-Mixup: Saliency Guided Joint Mixup with Supermodular Diversity, ICLR 2021; snu-mllab/Co-Mixup main.py, mixup.py, match.py";
    const RANDOM: bool = true;
    const QUERIES_MODEL: bool = true;
    /// The saliency pass on the clean batch, then the training pass on the mixed one.
    const PASSES_PER_STEP: u32 = 2;
    type Params = CoMixupParams;

    fn new(p: CoMixupParams) -> Result<Self> {
        if p.block_num == 0 || p.block_num < -1 {
            return Err(PluginError(format!("block_num is a positive count or −1 (random), got {}", p.block_num)));
        }
        if p.part < 1 || p.niter < 1 {
            return Err(PluginError("part and niter must be at least 1".into()));
        }
        if !["hard", "soft"].contains(&p.thres_type.as_str()) {
            return Err(PluginError(format!("thres_type is `hard` or `soft`, got `{}`", p.thres_type)));
        }
        let floats = [p.beta, p.gamma, p.thres, p.eta, p.alpha, p.omega, p.clean_lam];
        if floats.iter().any(|v| !v.is_finite() || *v < 0.0) || p.omega > 1.0 || p.alpha <= 0.0 {
            return Err(PluginError(
                "beta, gamma, thres, eta and clean_lam must be finite and ≥ 0, alpha > 0, omega in [0, 1]".into(),
            ));
        }
        Ok(CoMixup { p, image: None })
    }

    fn setup(&mut self, info: &RunInfo) -> Result<()> {
        let [_, h, w] = image_shape(Self::ID, info.image)?;
        if h != w {
            return Err(PluginError(format!("{} mixes square images; these are {h}×{w}", Self::ID)));
        }
        if self.p.block_num > w {
            return Err(PluginError(format!("block_num {} exceeds the image side {w}", self.p.block_num)));
        }
        if self.p.block_num == -1 && w < 16 {
            return Err(PluginError(format!("block_num: −1 may draw 16 blocks per side; the images are {w} wide")));
        }
        if self.p.omega > 0.0 && w < 8 {
            return Err(PluginError(format!(
                "the compatibility term pools saliency over 8×8 windows; the images are {w}×{w}: set omega: 0"
            )));
        }
        self.image = info.image;
        Ok(())
    }
}

/// One partition's search, in float64: the inputs' block costs and compatibility in, the
/// outputs' block masks out.
pub struct Search<'a> {
    pub p: &'a CoMixupParams,
    /// `cost[j][s]`: input j's cost at block s (row-major), the prior not yet added.
    pub cost: Vec<Vec<f64>>,
    /// The compatibility matrix `A`, n × n.
    pub a: Vec<Vec<f64>>,
    pub side: usize,
}

/// An output's mask: `mask[s][j]`, input j's share of block s.
type Mask = Vec<Vec<f64>>;

impl Search<'_> {
    /// `get_onehot_matrix`: the n outputs' masks.
    pub fn run(mut self, rng: &mut HostRng<'_>) -> Vec<Mask> {
        let n = self.cost.len();
        let sites = self.side * self.side;
        let hw = sites as f64;
        let thres = self.p.thres * hw;
        let beta = self.p.beta / hw;
        let gamma = self.p.gamma / hw;
        let eta = self.p.eta / hw;
        let draws: Vec<f64> = (0..n).map(|_| rng.gamma(self.p.alpha)).collect();
        let total: f64 = draws.iter().sum();
        for (c, g) in self.cost.iter_mut().zip(&draws) {
            let prior = eta * (g / total + 1e-8).ln();
            c.iter_mut().for_each(|v| *v -= prior);
        }
        let mut masks: Vec<Mask> = (0..n)
            .map(|_| {
                (0..sites)
                    .map(|_| {
                        let mut row = vec![0.0; n];
                        row[rng.below(n as u64) as usize] = 1.0;
                        row
                    })
                    .collect()
            })
            .collect();
        let mut loss_prev = self.objective(&masks, beta, gamma);
        let mut penalty = vec![0.0; n];
        for m in &masks {
            for (p, c) in penalty.iter_mut().zip(counts(m)) {
                *p += c;
            }
        }
        let mut add_cost: Option<Vec<Vec<f64>>> = None;
        let niter = self.p.niter as usize;
        for iter in 0..niter {
            for i in 0..n {
                let label_count = counts(&masks[i]);
                for (p, c) in penalty.iter_mut().zip(&label_count) {
                    *p -= c;
                }
                let ap: Vec<f64> =
                    self.a.iter().map(|row| row.iter().zip(&penalty).map(|(a, p)| a * p).sum()).collect();
                let modular: Vec<f64> = ap
                    .iter()
                    .map(|&v| {
                        let on = if v > thres { 1.0 } else { 0.0 };
                        if self.p.thres_type == "hard" {
                            2.0 * gamma * (on * v)
                        } else {
                            2.0 * gamma * (on * (v - thres))
                        }
                    })
                    .collect();
                let cost: Vec<Vec<f64>> = (0..sites)
                    .map(|s| {
                        (0..n)
                            .map(|j| {
                                let extra = add_cost.as_ref().map_or(0.0, |a| gamma * a[i][j]);
                                self.cost[j][s] + modular[j] + extra
                            })
                            .collect()
                    })
                    .collect();
                masks[i] = self.cut(&cost, &label_count, beta, iter);
                for (p, c) in penalty.iter_mut().zip(counts(&masks[i])) {
                    *p += c;
                }
            }
            if self.p.set_resolve && iter + 2 == niter {
                add_cost = Some(resolve(&masks));
            }
            let loss = self.objective(&masks, beta, gamma);
            if ((loss_prev - loss) / loss).abs() < 1e-6 {
                break;
            }
            loss_prev = loss;
        }
        masks
    }

    /// `graphcut_wrapper`: one output's labeling from its costs `cost[s][j]`.
    fn cut(&self, cost: &[Vec<f64>], label_count: &[f64], beta: f64, iter: usize) -> Mask {
        let n = label_count.len();
        let assigned: Vec<usize> = (0..n).filter(|&j| label_count[j] > 0.0).collect();
        let n_label = if iter > 0 { assigned.len() } else { 0 };
        // The half-half labels added after the n inputs: their parents and shares.
        let (parents, halves): (Vec<usize>, Vec<[f64; 3]>) = match n_label {
            2 => (assigned.clone(), vec![[0.5, 0.5, 0.0]]),
            k if k >= 3 => (top3(label_count), vec![[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]),
            _ => (vec![], vec![]),
        };
        let labels = n + halves.len();
        let mut smooth = vec![0.0f32; labels * labels];
        for a in 0..labels {
            for b in 0..labels {
                if a != b {
                    smooth[a * labels + b] = 1.0;
                }
            }
        }
        // Smoothness between a half-half label and an input: 0.25 to a parent, 1 otherwise.
        for (k, share) in halves.iter().enumerate() {
            for (m, &j) in parents.iter().enumerate() {
                let v = if share[m] > 0.0 { 0.25 } else { 1.0 };
                smooth[(n + k) * labels + j] = v;
                smooth[j * labels + n + k] = v;
            }
        }
        let mut data = Vec::with_capacity(cost.len() * labels);
        for row in cost {
            data.extend(row.iter().map(|&c| unary_int(c)));
            for share in &halves {
                let mixed = if parents.len() == 2 {
                    (row[parents[0]] + row[parents[1]]) / 2.0
                } else {
                    parents.iter().zip(share).map(|(&j, s)| row[j] * s).sum::<f64>()
                };
                data.push(unary_int(mixed - 5e-4));
            }
        }
        let grid = Grid {
            height: self.side,
            width: self.side,
            labels,
            data,
            smooth: smooth.into_iter().map(smooth_int).collect(),
            weight: weight_int(beta),
        };
        grid.swap()
            .into_iter()
            .map(|l| {
                let mut row = vec![0.0; n];
                if l < n {
                    row[l] = 1.0;
                } else {
                    for (m, &j) in parents.iter().enumerate() {
                        row[j] += halves[l - n][m];
                    }
                }
                row
            })
            .collect()
    }

    /// `obj_fn`: unary + smoothness + diversity of the outputs' masks.
    fn objective(&self, masks: &[Mask], beta: f64, gamma: f64) -> f64 {
        let side = self.side;
        let n = self.cost.len();
        let mut unary = 0.0;
        let mut smooth = 0.0;
        for m in masks {
            for (s, row) in m.iter().enumerate() {
                unary += (0..n).map(|j| self.cost[j][s] * row[j]).sum::<f64>();
                let (r, c) = (s / side, s % side);
                for t in [(r + 1 < side).then(|| s + side), (c + 1 < side).then(|| s + 1)].into_iter().flatten() {
                    smooth += row.iter().zip(&m[t]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
                }
            }
        }
        let per: Vec<Vec<f64>> = masks.iter().map(counts).collect();
        let total: f64 = (0..n).map(|j| per.iter().map(|c| c[j]).sum::<f64>().powi(2)).sum();
        let own: f64 = per.iter().flatten().map(|c| c * c).sum();
        unary + beta / 2.0 * smooth + gamma * (total - own)
    }
}

/// The three most used inputs, in index order, as the reference's `torch.topk(label_count, 3)`
/// picks them. Only a tie across the third place needs torch's own choice, so only then is it
/// asked.
fn top3(label_count: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..label_count.len()).collect();
    order.sort_by(|&a, &b| label_count[b].total_cmp(&label_count[a]));
    let mut top = if order.get(3).is_some_and(|&j| label_count[j] == label_count[order[2]]) {
        let (_, idx) = Tensor::from_slice(label_count).topk(3, -1, true, true);
        Vec::<i64>::try_from(&idx).expect("indices").into_iter().map(|v| v as usize).collect()
    } else {
        order[..3].to_vec()
    };
    top.sort_unstable();
    top
}

/// Each input's total share of an output.
fn counts(mask: &Mask) -> Vec<f64> {
    let n = mask.first().map_or(0, Vec::len);
    (0..n).map(|j| mask.iter().map(|row| row[j]).sum()).collect()
}

/// `resolve_label`: for each pair of outputs i1 < i2 that use the same set of inputs (of more
/// than one), output i1 is charged for the set's first input and i2 for its second.
fn resolve(masks: &[Mask]) -> Vec<Vec<f64>> {
    let sets: Vec<Vec<bool>> = masks.iter().map(|m| counts(m).iter().map(|&c| c > 0.0).collect()).collect();
    let n = sets.first().map_or(0, Vec::len);
    let mut add = vec![vec![0.0; n]; masks.len()];
    for i1 in 0..sets.len() {
        for i2 in i1 + 1..sets.len() {
            if sets[i1] != sets[i2] {
                continue;
            }
            let used: Vec<usize> = (0..n).filter(|&j| sets[i1][j]).collect();
            if used.len() > 1 {
                add[i1][used[0]] = 1.0;
                add[i2][used[1]] = 1.0;
            }
        }
    }
    add
}

/// The masks as a tensor `[outputs, inputs, side, side]`.
fn mask_tensor(masks: &[Mask], side: i64) -> Tensor {
    let n = masks.first().and_then(|m| m.first()).map_or(0, Vec::len) as i64;
    let flat: Vec<f64> = masks.iter().flat_map(|m| m.iter().flatten().copied()).collect();
    Tensor::from_slice(&flat).reshape([masks.len() as i64, side, side, n])
}

/// `mix_input`: the outputs (in the inputs' kind and device) and their soft targets (float64).
pub fn mix(masks: &[Mask], side: i64, x: &Tensor, onehot: &Tensor) -> (Tensor, Tensor) {
    let m = mask_tensor(masks, side);
    let width = x.size()[3];
    let im =
        m.permute([0, 3, 1, 2]).upsample_nearest2d([width, width], None, None).to_kind(x.kind()).to_device(x.device());
    let out = (im.unsqueeze(2) * x.unsqueeze(0)).sum_dim_intlist(1, false, x.kind());
    let classes = onehot.size()[1];
    let t = m.matmul(&onehot.to_kind(Kind::Double)).reshape([masks.len() as i64, side * side, classes]);
    let t = t.sum_dim_intlist(-2, false, Kind::Double);
    let t = &t / t.sum_dim_intlist(-1, true, Kind::Double);
    (out, t)
}

impl BatchTransform for CoMixup {
    fn transform(&mut self, batch: Batch, rng: &mut HostRng<'_>) -> Result<Transformed> {
        let [ch, h, w] = self.image.ok_or_else(|| PluginError(format!("{} was not set up", Self::ID)))?;
        let b = batch.x.size()[0];
        let model = batch.model.as_ref().ok_or_else(|| {
            PluginError(format!("{} needs the model's input gradient, and this host runs no model here", Self::ID))
        })?;
        let x = batch.x.reshape([b, ch, h, w]);
        let clean = self.p.clean_lam > 0.0;
        let weight = if clean { 2.0 * self.p.clean_lam / batch.num_classes as f64 } else { 1.0 };
        let grad = model.input_grad(weight, clean, clean)?.reshape([b, ch, h, w]);
        let cpu = |t: Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
        let sc = cpu(grad).pow_tensor_scalar(2).mean_dim(1, false, Kind::Double).sqrt();
        if !bool::try_from(sc.isfinite().all()).unwrap_or(false) {
            return Err(PluginError("the input gradient is not finite".into()));
        }
        let dist = (self.p.omega > 0.0).then(|| salient_distance(&sc));
        let block_num = if self.p.block_num == -1 { 1i64 << (1 + rng.below(4)) } else { self.p.block_num };
        let block = w / block_num;
        let pooled = sc.avg_pool2d([block, block], [block, block], [0, 0], false, true, None::<i64>);
        let side = pooled.size()[1];
        let onehot = batch.y.one_hot(batch.num_classes).to_device(Device::Cpu).to_kind(Kind::Double);
        let (mut outs, mut targets) = (Vec::new(), Vec::new());
        let part = self.p.part;
        for lo in (0..b).step_by(part as usize) {
            let n = part.min(b - lo);
            let xs = x.narrow(0, lo, n);
            if n == 1 {
                outs.push(xs);
                targets.push(onehot.narrow(0, lo, 1));
                continue;
            }
            let sp = pooled.narrow(0, lo, n);
            let rows: Vec<Vec<f64>> = (0..n)
                .map(|j| {
                    let v = Vec::<f64>::try_from(sp.get(j).flatten(0, -1)).expect("saliency");
                    let sum: f64 = v.iter().sum();
                    v.iter().map(|s| if sum > 0.0 { -s / sum } else { 0.0 }).collect()
                })
                .collect();
            let nu = n as usize;
            let mut a: Vec<Vec<f64>> =
                (0..nu).map(|i| (0..nu).map(|k| f64::from(u8::from(i == k))).collect()).collect();
            if let Some(d) = &dist {
                let dp: Vec<Vec<f64>> =
                    (0..nu).map(|i| d[lo as usize + i][lo as usize..lo as usize + nu].to_vec()).collect();
                let total: f64 = dp.iter().flatten().sum();
                for (i, row) in a.iter_mut().enumerate() {
                    for (k, v) in row.iter_mut().enumerate() {
                        let dist = if total > 0.0 { dp[i][k] / total * n as f64 } else { 0.0 };
                        *v = (1.0 - self.p.omega) * *v + self.p.omega * dist;
                    }
                }
            }
            let search = Search { p: &self.p, cost: rows, a, side: side as usize };
            let masks = search.run(rng);
            let (o, t) = mix(&masks, side, &xs, &onehot.narrow(0, lo, n));
            outs.push(o);
            targets.push(t);
        }
        let device = batch.x.device();
        let out = Tensor::cat(&outs, 0).reshape([b, ch * h * w]);
        let target = Tensor::cat(&targets, 0).to_kind(batch.x.kind()).to_device(device);
        Ok(Transformed { x: out, target })
    }
}

/// L1 distances between the examples' most salient 8×8 windows (`utils.distance(…, 'l1')` of
/// the argmax positions).
fn salient_distance(sc: &Tensor) -> Vec<Vec<f64>> {
    let b = sc.size()[0];
    let z = sc.avg_pool2d([8, 8], [1, 1], [0, 0], false, true, None::<i64>);
    let zw = z.size()[2];
    let idx = Vec::<i64>::try_from(z.reshape([b, -1]).argmax(1, false)).expect("argmax");
    let pos: Vec<(i64, i64)> = idx.iter().map(|i| (i / zw, i % zw)).collect();
    pos.iter().map(|a| pos.iter().map(|c| ((a.0 - c.0).abs() + (a.1 - c.1).abs()) as f64).collect()).collect()
}
