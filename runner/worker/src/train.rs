//! The `train` task: mini-batch training with evaluation on the validation and test splits
//! after every epoch.

use crate::data::{self, Split};
use crate::events::Emitter;
use crate::model;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig as _};
use tch::{Device, Kind, Tensor};
use xlab_proto::FailureCause;
use xlab_spec::config::{JobConfig, OptimizerConfig};

/// A job failure with its classified cause.
#[derive(Debug)]
pub struct Failure {
    pub cause: FailureCause,
    pub message: String,
}

impl Failure {
    pub fn new(cause: FailureCause, message: impl Into<String>) -> Self {
        Self { cause, message: message.into() }
    }
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        let message = e.to_string();
        let cause = if message.contains("out of memory") { FailureCause::OutOfMemory } else { FailureCause::Error };
        Self { cause, message }
    }
}

fn build_optimizer(vs: &nn::VarStore, cfg: &OptimizerConfig) -> Result<nn::Optimizer, Failure> {
    Ok(match cfg {
        OptimizerConfig::Sgd(o) => {
            nn::Sgd { momentum: o.momentum, dampening: 0.0, wd: o.weight_decay, nesterov: o.nesterov }
                .build(vs, o.lr)?
        }
        OptimizerConfig::Adam(o) => {
            nn::Adam { beta1: o.beta1, beta2: o.beta2, wd: o.weight_decay, eps: o.eps, amsgrad: false }
                .build(vs, o.lr)?
        }
        OptimizerConfig::AdamW(o) => {
            nn::AdamW { beta1: o.beta1, beta2: o.beta2, wd: o.weight_decay, eps: o.eps, amsgrad: false }
                .build(vs, o.lr)?
        }
    })
}

/// Mean loss and accuracy of the model on one split, without gradients.
fn evaluate(net: &impl Module, split: &Split, device: Device) -> Result<(f64, f64), Failure> {
    tch::no_grad(|| {
        let x = split.x.to_device(device);
        let y = split.y.to_device(device);
        let logits = net.forward(&x);
        let loss = f64::try_from(logits.cross_entropy_for_logits(&y))?;
        let acc = f64::try_from(logits.accuracy_for_logits(&y))?;
        Ok((loss, acc))
    })
}

/// Trains the job's model; returns the final metrics.
pub fn run(
    cfg: &JobConfig,
    seed: u64,
    device: Device,
    run_dir: &Path,
    out: &mut Emitter,
) -> Result<BTreeMap<String, f64>, Failure> {
    let data = data::build(&cfg.data);
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let net = model::build(&vs.root(), &cfg.model, data.input_dim, data.classes);
    let mut opt = build_optimizer(&vs, &cfg.optimizer)?;
    tracing::info!(params = model::parameter_count(&vs), train = data.train.len(), "model built");

    let x_train = data.train.x.to_device(device);
    let y_train = data.train.y.to_device(device);
    let n = data.train.len();
    let bs = cfg.batch_size as usize;
    let mut summary = BTreeMap::new();
    for epoch in 0..u64::from(cfg.epochs) {
        let order = data::epoch_order(n, seed, epoch);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0usize);
        for chunk in order.chunks(bs) {
            let idx = Tensor::from_slice(chunk).to_device(device);
            let xb = x_train.index_select(0, &idx);
            let yb = y_train.index_select(0, &idx);
            let logits = net.forward(&xb);
            let loss = logits.cross_entropy_for_logits(&yb);
            opt.backward_step(&loss);
            let l = f64::try_from(&loss)?;
            if !l.is_finite() {
                return Err(Failure::new(
                    FailureCause::Diverged,
                    format!("training loss is {l} in epoch {}", epoch + 1),
                ));
            }
            let b = chunk.len();
            loss_sum += l * b as f64;
            correct += f64::try_from(logits.argmax(-1, false).eq_tensor(&yb).to_kind(Kind::Float).sum(Kind::Float))?;
            seen += b;
        }
        let mut values = BTreeMap::new();
        values.insert("train.loss".to_string(), loss_sum / seen as f64);
        values.insert("train.acc".to_string(), correct / seen as f64);
        for (name, split) in [("val", &data.val), ("test", &data.test)] {
            if split.is_empty() {
                continue;
            }
            let (loss, acc) = evaluate(&net, split, device)?;
            values.insert(format!("{name}.loss"), loss);
            values.insert(format!("{name}.acc"), acc);
        }
        values.insert("epoch".to_string(), (epoch + 1) as f64);
        tracing::info!(
            epoch = epoch + 1,
            train_loss = values["train.loss"],
            test_acc = values.get("test.acc").copied(),
            "epoch done"
        );
        out.metrics(epoch + 1, values.clone());
        summary = values;
    }
    let weights = run_dir.join("weights.safetensors");
    save_atomically(&vs, &weights)?;
    out.artifact("weights", "weights.safetensors", "weights");
    Ok(summary)
}

/// Writes the weights to a temporary file, syncs it and renames it into place, so a reader never
/// sees a partial file.
fn save_atomically(vs: &nn::VarStore, path: &Path) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp.safetensors");
    vs.save(&tmp)?;
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(&tmp).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot rename {}: {e}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        sync(dir).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(())
}
