//! `xlab-worker forward`: a trained weights file's outputs on given inputs, the model rebuilt from
//! the file's own metadata. It is how another implementation of xlab's models (the PyTorch
//! module `python/xlab_torch.py`) is checked against xlab's: same file, same inputs, same
//! outputs.
//!
//! Inputs and outputs are safetensors files: `x` (rows `[B, input_dim]`, float32) and, for a
//! diffusion model, `t` (timesteps `[B]`, float32) and `y` (labels `[B]`, int64, the null label
//! being the class count); the output is `out`: logits `[B, classes]`, or the denoiser's
//! prediction `[B, input_dim]`. Classifiers run in evaluation mode (BatchNorm's running
//! statistics).

use crate::denoiser::DiffusionNet;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Tensor};
use xlab_plan::config::{Diffusion, ModelConfig};

/// The `__metadata__` of a safetensors file.
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| format!("{}: not a safetensors file ({e})", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(format!("{}: not a safetensors file (a header of {n} bytes)", path.display()));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| format!("{}: a cut-off safetensors header ({e})", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("{}: a bad safetensors header ({e})", path.display()))?;
    Ok(v.get("__metadata__")
        .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
        .unwrap_or_default())
}

pub fn run(weights: &Path, input: &Path, out: &Path) -> Result<(), String> {
    let about = metadata(weights)?;
    let get = |k: &str| {
        about
            .get(k)
            .ok_or_else(|| format!("{}: no `{k}` in its metadata; is it xlab's weights file?", weights.display()))
    };
    let model: ModelConfig =
        serde_json::from_str(get("xlab.model")?).map_err(|e| format!("{}: xlab.model: {e}", weights.display()))?;
    let number = |k: &str| get(k)?.parse::<usize>().map_err(|e| format!("{}: {k}: {e}", weights.display()));
    let (input_dim, classes) = (number("xlab.input_dim")?, number("xlab.classes")?);
    let image: Option<[i64; 3]> = match about.get("xlab.image") {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| format!("{}: xlab.image: {e}", weights.display()))?),
        None => None,
    };
    let inputs: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(input).map_err(|e| format!("{}: {e}", input.display()))?.into_iter().collect();
    let take = |k: &str| inputs.get(k).ok_or_else(|| format!("{}: no tensor `{k}`", input.display()));
    let mut vs = nn::VarStore::new(Device::Cpu);
    let y = if about.contains_key("xlab.diffusion") {
        let d: Diffusion = serde_json::from_str(get("xlab.diffusion")?)
            .map_err(|e| format!("{}: xlab.diffusion: {e}", weights.display()))?;
        let net = DiffusionNet::build(&vs.root(), &model, input_dim, image, d.conditional.then_some(classes))?;
        net.set_train(false);
        vs.load(weights).map_err(|e| format!("{}: {e}", weights.display()))?;
        let (x, t) = (take("x")?, take("t")?);
        let labels = if d.conditional { Some(take("y")?) } else { None };
        tch::no_grad(|| net.forward(x, t, labels))
    } else {
        let net = crate::model::build(&vs.root(), &model, input_dim, image, classes);
        vs.load(weights).map_err(|e| format!("{}: {e}", weights.display()))?;
        let x = take("x")?;
        tch::no_grad(|| net.forward_t(x, false))
    };
    Tensor::write_safetensors(&[("out", &y)], out).map_err(|e| format!("{}: {e}", out.display()))
}
