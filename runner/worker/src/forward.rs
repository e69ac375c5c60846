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
//!
//! `--precision bf16 | fp16` runs the forward pass under the autocast training and sampling use
//! (the output in float32). With a `target` tensor (`[B, input_dim]`) for a diffusion model, it
//! also computes the training loss as the training loop does (`diffusion::denoising_loss`) and
//! its gradients: `loss` and `grad.<parameter>` join the output.
//!
//! `--attention '{"use": "diffusion.nag", ...}'` runs a UNet with cross-attention under an
//! attention guidance from the installed plugins: the first rows (as many as the labels of the
//! `y_neg` input) also attend over the negative labels' tokens, as sampling runs the
//! conditional rows; `t`'s first value is the timestep the guidance's window sees.

use crate::denoiser::DiffusionNet;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Tensor};
use xlab_plan::config::{Diffusion, ModelConfig, Precision};

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

/// An instance of the attention guidance named in `spec` (`{"use": ID, params...}`), its
/// parameters completed with their defaults, from the default plugin folders.
fn attention_instance(spec: &str) -> Result<xlab_plugin_host::Instance, String> {
    let mut given: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(spec).map_err(|e| format!("--attention: not a JSON object: {e}"))?;
    let id = match given.remove("use") {
        Some(serde_json::Value::String(id)) => id,
        _ => return Err("--attention: name the component as `\"use\": \"family.variant\"`".into()),
    };
    let (plugins, registry) = xlab_plugin_host::discover(&crate::default_plugin_dirs(), &[]);
    let (plugin, info) =
        registry.component(&id).ok_or_else(|| format!("--attention: no installed plugin provides `{id}`"))?;
    let params = xlab_proto::plugins::resolve_params(info, &given).map_err(|e| format!("--attention: {e:?}"))?;
    let lib = plugins.iter().find(|p| p.info.id == plugin.id).expect("the registry lists loaded plugins");
    lib.instantiate(&id, &serde_json::Value::Object(params))
}

pub fn run(
    weights: &Path,
    input: &Path,
    out: &Path,
    precision: Precision,
    attention: Option<&str>,
) -> Result<(), String> {
    crate::amp::set_job_precision(precision);
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
        if let Some(target) = inputs.get("target") {
            let loss = crate::diffusion::denoising_loss(&net, x, t, labels, target).map_err(|f| f.message)?;
            loss.backward();
            let mut named: Vec<(String, Tensor)> =
                vs.variables().into_iter().map(|(n, v)| (format!("grad.{n}"), v.grad())).collect();
            named.push(("loss".to_string(), loss.detach().reshape([1])));
            let region = crate::amp::job_region(Device::Cpu)?;
            let y = tch::no_grad(|| crate::amp::full(net.forward(x, t, labels)));
            drop(region);
            named.push(("out".to_string(), y));
            let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
            return Tensor::write_safetensors(&refs, out).map_err(|e| format!("{}: {e}", out.display()));
        }
        let _region = crate::amp::job_region(Device::Cpu)?;
        match attention {
            None => tch::no_grad(|| crate::amp::full(net.forward(x, t, labels))),
            Some(spec) => {
                let mut inst = attention_instance(spec)?;
                let t_max = (d.timesteps - 1) as f64;
                let t0 = f64::try_from(t.get(0)).map_err(|e| e.to_string())?;
                let mut combine = |pos: &Tensor, neg: &Tensor| inst.attend(pos, neg, t0, t_max);
                let negative = take("y_neg")?.to_kind(tch::Kind::Int64);
                let mut guide = crate::denoiser::AttnGuide { negative, combine: &mut combine };
                crate::amp::full(tch::no_grad(|| net.forward_guided(x, t, labels, Some(&mut guide)))?)
            }
        }
    } else {
        let net = crate::model::build(&vs.root(), &model, input_dim, image, classes);
        vs.load(weights).map_err(|e| format!("{}: {e}", weights.display()))?;
        let x = take("x")?;
        let _region = crate::amp::job_region(Device::Cpu)?;
        tch::no_grad(|| crate::amp::full(net.forward_t(x, false)))
    };
    Tensor::write_safetensors(&[("out", &y)], out).map_err(|e| format!("{}: {e}", out.display()))
}
