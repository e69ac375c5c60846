//! What a job writes to its run folder, and how: when to checkpoint ([`CheckpointPlan`]),
//! saving and restoring checkpoints with plugin and EMA state, final weights with their
//! safetensors metadata, initial weights from a file, JTT's error lists, standardization
//! statistics; every file written atomically (a temporary file, fsync, rename).

use crate::checkpoint;
use crate::data::{self};
use crate::events::Emitter;
use crate::host::Components;
use crate::optim::Optimizer;
use crate::Failure;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn;
use tch::Tensor;
use xlab_plan::config::JobConfig;
use xlab_proto::FailureCause;

/// Where and how often a job checkpoints.
pub struct CheckpointPlan<'a> {
    pub job_id: &'a str,
    /// After every this many epochs.
    pub every: u32,
    /// And at the end of an epoch this many milliseconds or more after the last checkpoint.
    pub every_ms: Option<u64>,
    /// And inside epochs, after every this many optimizer steps (of the whole run).
    pub every_steps: Option<u32>,
    /// An adaptive search's rung: stop after this epoch, at a checkpoint, as paused.
    pub pause_after: Option<u64>,
    /// Epochs (1-based) at whose end a diffusion training keeps its weights as well.
    pub keep_weights: &'a [u32],
    /// The finished job this one extends exactly, to start from when it has no checkpoint of
    /// its own.
    pub continue_from: Option<&'a xlab_proto::ContinueFrom>,
}

/// The weights a training kept at the end of `epoch` (`checkpoint.keep_weights`), raw or
/// averaged.
pub fn epoch_weights(averaged: bool, epoch: u32) -> String {
    if averaged {
        format!("weights_ema-epoch{epoch}.safetensors")
    } else {
        format!("weights-epoch{epoch}.safetensors")
    }
}

impl CheckpointPlan<'_> {
    /// The checkpoint a training starts from, announced: its own newest, or, with none, the
    /// checkpoint after the last epoch of the finished job it extends (`continue_from`), whose
    /// kept weights of earlier epochs it takes over. That job's checkpoint gone, or a kept
    /// weights file this job wants missing there, it starts from scratch.
    pub(crate) fn starting_point(
        &self,
        run_dir: &Path,
        out: &mut Emitter,
    ) -> Result<Option<checkpoint::Checkpoint>, Failure> {
        if let Some(c) = self.latest(run_dir) {
            announce_resume(out, &c, None);
            return Ok(Some(c));
        }
        let Some(from) = self.continue_from else { return Ok(None) };
        let mut skipped = Vec::new();
        let found = checkpoint::latest(&from.run_dir, &from.job_id, &mut skipped)
            .filter(|c| c.meta.epoch == from.epoch && c.meta.step_in_epoch == 0);
        let Some(c) = found else {
            tracing::warn!(
                "job {}'s checkpoint after epoch {} is gone; training from the start",
                from.job_id,
                from.epoch
            );
            return Ok(None);
        };
        // Kept weights of epochs the finished job covers: this job keeps them too.
        let wanted: Vec<String> = self
            .keep_weights
            .iter()
            .filter(|&&e| u64::from(e) <= from.epoch)
            .flat_map(|&e| [epoch_weights(false, e), epoch_weights(true, e)])
            .collect();
        let present: Vec<&String> = wanted.iter().filter(|f| from.run_dir.join(f).is_file()).collect();
        let raw_missing = self
            .keep_weights
            .iter()
            .any(|&e| u64::from(e) <= from.epoch && !from.run_dir.join(epoch_weights(false, e)).is_file());
        if raw_missing {
            tracing::info!(
                "job {} did not keep the weights of every epoch this job keeps; training from the start",
                from.job_id
            );
            return Ok(None);
        }
        for file in present {
            let bytes = std::fs::read(from.run_dir.join(file)).map_err(|e| {
                Failure::new(FailureCause::Error, format!("cannot read job {}'s {file}: {e}", from.job_id))
            })?;
            checkpoint::write_atomic(&run_dir.join(file), &bytes)
                .map_err(|e| Failure::new(FailureCause::Error, format!("cannot write {file}: {e}")))?;
            let name = file.trim_end_matches(".safetensors").replace('-', "_");
            out.artifact(&name, file, "weights");
        }
        announce_resume(out, &c, Some(&from.job_id));
        Ok(Some(c))
    }

    /// The newest valid checkpoint in `run_dir`, warning about each one skipped as invalid.
    pub(crate) fn latest(&self, run_dir: &Path) -> Option<checkpoint::Checkpoint> {
        let mut skipped = Vec::new();
        let latest = checkpoint::latest(run_dir, self.job_id, &mut skipped);
        for s in &skipped {
            tracing::warn!("skipping checkpoint {s}");
        }
        latest
    }

    /// A search's trial resumed from a checkpoint at (or past) the rung it is to pause at, with
    /// no batch of the next epoch done (its pause was not recorded before the run stopped):
    /// it pauses again at once, having trained nothing more.
    pub(crate) fn paused_at_resume(&self, epoch: u64, step_in_epoch: u64, epochs: u32) -> Result<(), Failure> {
        match self.pause_after {
            Some(p) if step_in_epoch == 0 && epoch >= p && epoch < u64::from(epochs) => Err(Failure::new(
                FailureCause::Paused,
                format!("paused after epoch {epoch} of {epochs} at a rung of its search, at a checkpoint"),
            )),
            _ => Ok(()),
        }
    }

    /// At the end of epoch `done` (1-based) of `epochs`: writes a checkpoint with `save` after
    /// the last epoch, when asked to stop (Ctrl-C, SIGTERM), when `every_ms` has passed since
    /// `last_saved`, and every `every` epochs; asked to stop, the job then ends as cancelled.
    pub(crate) fn end_of_epoch(
        &self,
        done: u64,
        epochs: u32,
        last_saved: &mut std::time::Instant,
        out: &mut Emitter,
        save: impl FnOnce() -> Result<String, Failure>,
    ) -> Result<(), Failure> {
        let last = done == u64::from(epochs);
        let stopping = !last && crate::stop_requested();
        let pausing = !last && self.pause_after == Some(done);
        let time_is_up = self.every_ms.is_some_and(|ms| last_saved.elapsed().as_millis() >= u128::from(ms));
        if last || stopping || pausing || time_is_up || done.is_multiple_of(u64::from(self.every.max(1))) {
            *last_saved = std::time::Instant::now();
            let path = save()?;
            out.send(&xlab_proto::Event::Checkpoint { epoch: done, path, step_in_epoch: 0 });
        }
        if stopping {
            return Err(Failure::new(
                FailureCause::Cancelled,
                format!("stopped after epoch {done} of {epochs}, at a checkpoint"),
            ));
        }
        if pausing {
            return Err(Failure::new(
                FailureCause::Paused,
                format!("paused after epoch {done} of {epochs} at a rung of its search, at a checkpoint"),
            ));
        }
        Ok(())
    }
}

/// Tells the coordinator that the job resumed, and re-sends what was measured before, so a
/// store that lost its last writes is made whole.
pub(crate) fn announce_resume(out: &mut Emitter, c: &checkpoint::Checkpoint, from_job: Option<&str>) {
    tracing::info!(epoch = c.meta.epoch, step_in_epoch = c.meta.step_in_epoch, from_job, "resuming from checkpoint");
    out.send(&xlab_proto::Event::Resumed {
        epoch: c.meta.epoch,
        step_in_epoch: c.meta.step_in_epoch,
        from_job: from_job.map(str::to_string),
    });
    for (step, values) in &c.meta.metrics {
        out.metrics(*step, values.clone());
    }
}

/// Writes the training split's statistics a `standardize: true` job scaled its data with.
pub(crate) fn record_standardization(run_dir: &Path, data: &data::Dataset, out: &mut Emitter) -> Result<(), Failure> {
    let Some(st) = &data.standardized else { return Ok(()) };
    let bytes = serde_json::to_vec_pretty(st).expect("statistics serialize");
    checkpoint::write_atomic(&run_dir.join("standardization.json"), &bytes)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot write standardization.json: {e}")))?;
    out.artifact("standardization", "standardization.json", "training-split feature mean and std");
    Ok(())
}

/// Copies the tensors of a safetensors file into the model's variables, by name. Every variable
/// must be there with its shape; PyTorch's integer `num_batches_tracked` converts.
pub(crate) fn load_init(vars: &[(String, Tensor)], path: &str) -> Result<(), Failure> {
    let fail = |m: String| Failure::new(FailureCause::Config, format!("`init` {path}: {m}"));
    let given = Tensor::read_safetensors(path).map_err(|e| fail(format!("cannot read it as safetensors: {e}")))?;
    let mut missing = Vec::new();
    for (name, var) in vars {
        match given.iter().find(|(n, _)| n == name) {
            Some((_, t)) if t.size() == var.size() => {
                tch::no_grad(|| var.shallow_clone().copy_(&t.to_kind(var.kind())));
            }
            Some((_, t)) => {
                return Err(fail(format!("`{name}` has shape {:?}, the model's is {:?}", t.size(), var.size())));
            }
            None => missing.push(name.as_str()),
        }
    }
    if !missing.is_empty() {
        let have: Vec<&str> = given.iter().map(|(n, _)| n.as_str()).collect();
        return Err(fail(format!(
            "has no tensor for {} (it has {}); names follow PyTorch's state_dict of the same model",
            missing.join(", "),
            have.join(", ")
        )));
    }
    let unused: Vec<&str> =
        given.iter().map(|(n, _)| n.as_str()).filter(|n| !vars.iter().any(|(v, _)| v == n)).collect();
    if !unused.is_empty() {
        return Err(fail(format!("has tensors the model does not: {}", unused.join(", "))));
    }
    Ok(())
}

/// Writes the epoch's training-pass errors into the run folder, for dependent jobs (JTT).
pub(crate) fn write_train_errors(run_dir: &Path, epoch: u64, n: usize, errors: Vec<u64>) -> Result<(), Failure> {
    let path = xlab_proto::artifacts::train_errors_path(run_dir, epoch);
    let io = |e: std::io::Error| Failure::new(FailureCause::Error, format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let record = xlab_proto::artifacts::TrainErrors { epoch, n_train: n as u64, errors };
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&record).expect("json")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// A checkpoint's description with `epoch` epochs completed (plugin state, file and hash are
/// filled in when it is written).
pub(crate) fn checkpoint_meta(
    ckpt: &CheckpointPlan<'_>,
    epoch: u64,
    global_step: u64,
    opt: &Optimizer,
    rng: &ChaCha8Rng,
    history: &[(u64, BTreeMap<String, f64>)],
) -> checkpoint::Meta {
    checkpoint::Meta {
        format: checkpoint::FORMAT,
        job_id: ckpt.job_id.to_string(),
        epoch,
        global_step,
        optimizer_steps: opt.steps,
        plugin_rng_word_pos: rng.get_word_pos().to_string(),
        plugins: BTreeMap::new(),
        metrics: history.to_vec(),
        step_in_epoch: 0,
        partial: None,
        loss_scale: None,
        ema_updates: None,
        tensors_file: String::new(),
        tensors_bytes: 0,
        tensors_sha256: String::new(),
    }
}

/// Gathers model, optimizer and plugin state (and `extra` tensors) into a checkpoint and
/// writes it.
pub(crate) fn save_checkpoint(
    run_dir: &Path,
    mut meta: checkpoint::Meta,
    named: &[(String, Tensor)],
    opt: &Optimizer,
    comps: &mut Components,
    extra: Vec<(String, Tensor)>,
    ema: Option<&crate::ema::Average>,
) -> Result<String, Failure> {
    let mut tensors: Vec<(String, Tensor)> = named.iter().map(|(n, t)| (format!("model.{n}"), t.detach())).collect();
    tensors.extend(extra);
    if let Some(a) = ema {
        meta.ema_updates = Some(a.updates);
        tensors.extend(a.state_tensors());
    }
    tensors.extend(opt.state_tensors());
    for (slot, inst) in comps.slots() {
        let (json, ts) = inst.save_state().map_err(|m| Failure::new(FailureCause::Error, m))?;
        meta.plugins.insert(slot.to_string(), json);
        tensors.extend(ts.into_iter().map(|(n, t)| (format!("plugin.{slot}.{n}"), t)));
    }
    let path = checkpoint::save(run_dir, meta, &tensors).map_err(|m| Failure::new(FailureCause::Error, m))?;
    Ok(path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default())
}

/// Puts model weights, optimizer state, plugin state, the random stream and the weights'
/// average (when the run keeps one) back.
pub(crate) fn restore(
    c: &checkpoint::Checkpoint,
    named: &[(String, Tensor)],
    opt: &mut Optimizer,
    comps: &mut Components,
    rng: &mut ChaCha8Rng,
    ema: Option<&mut crate::ema::Average>,
) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("checkpoint after epoch {}: {m}", c.meta.epoch));
    if let Some(a) = ema {
        a.restore(&c.tensors, c.meta.ema_updates.unwrap_or(0))
            .map_err(|m| bad(format!("the weights' average: {m}")))?;
    }
    tch::no_grad(|| -> Result<(), Failure> {
        for (name, t) in named {
            let key = format!("model.{name}");
            let saved = c.tensors.iter().find(|(n, _)| *n == key).ok_or_else(|| bad(format!("no `{key}`")))?;
            let mut t = t.shallow_clone();
            t.f_copy_(&saved.1).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    })?;
    opt.load_state(c.meta.optimizer_steps, &c.tensors).map_err(bad)?;
    for (slot, inst) in comps.slots() {
        let json = c.meta.plugins.get(slot).cloned().unwrap_or(serde_json::Value::Null);
        let prefix = format!("plugin.{slot}.");
        let ts: Vec<(String, Tensor)> = c
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|k| (k.to_string(), t.shallow_clone())))
            .collect();
        inst.load_state(&json, &ts).map_err(bad)?;
    }
    let pos: u128 = c.meta.plugin_rng_word_pos.parse().map_err(|e| bad(format!("random stream position: {e}")))?;
    rng.set_word_pos(pos);
    Ok(())
}

pub(crate) fn save_atomically_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp.safetensors");
    Tensor::write_safetensors(tensors, &tmp)?;
    finish_atomic(&tmp, path)
}

pub(crate) fn save_atomically(vs: &nn::VarStore, path: &Path) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp.safetensors");
    vs.save(&tmp)?;
    finish_atomic(&tmp, path)
}

/// What any trained model's weights say about themselves (safetensors metadata): the model's
/// config, the class count, the input width and the image shape.
pub(crate) fn model_metadata(cfg: &JobConfig, data: &data::Dataset) -> BTreeMap<String, String> {
    let mut about = BTreeMap::new();
    about.insert("xlab.model".to_string(), serde_json::to_string(&cfg.model).expect("json"));
    about.insert("xlab.classes".to_string(), data.classes.to_string());
    about.insert("xlab.input_dim".to_string(), data.input_dim.to_string());
    if let Some(image) = data.image {
        about.insert("xlab.image".to_string(), serde_json::to_string(&image).expect("json"));
    }
    about
}

/// Writes a training's final weights, and the weights' average when it keeps one, each with
/// `about` as its metadata, and reports them as artifacts.
pub(crate) fn save_weights(
    vs: &nn::VarStore,
    ema: Option<&crate::ema::Average>,
    run_dir: &Path,
    about: &BTreeMap<String, String>,
    out: &mut Emitter,
) -> Result<(), Failure> {
    let names = ("weights".to_string(), "weights.safetensors".to_string());
    let averaged = ("weights_ema".to_string(), crate::ema::EMA_WEIGHTS.to_string());
    save_weights_as(vs, ema, run_dir, about, out, names, averaged)
}

/// Writes the weights at the end of `epoch` as [`epoch_weights`] names them, when the plan
/// keeps that epoch's (`checkpoint.keep_weights`).
pub(crate) fn keep_epoch_weights(
    plan: &CheckpointPlan<'_>,
    epoch: u64,
    vs: &nn::VarStore,
    ema: Option<&crate::ema::Average>,
    run_dir: &Path,
    about: &BTreeMap<String, String>,
    out: &mut Emitter,
) -> Result<(), Failure> {
    let Some(e) = plan.keep_weights.iter().copied().find(|&e| u64::from(e) == epoch) else { return Ok(()) };
    let names = (format!("weights_epoch{e}"), epoch_weights(false, e));
    let averaged = (format!("weights_ema_epoch{e}"), epoch_weights(true, e));
    save_weights_as(vs, ema, run_dir, about, out, names, averaged)
}

/// Writes weights (and their average) under the given artifact names and file names.
fn save_weights_as(
    vs: &nn::VarStore,
    ema: Option<&crate::ema::Average>,
    run_dir: &Path,
    about: &BTreeMap<String, String>,
    out: &mut Emitter,
    (name, file): (String, String),
    (ema_name, ema_file): (String, String),
) -> Result<(), Failure> {
    let weights = run_dir.join(&file);
    save_atomically(vs, &weights)?;
    add_metadata(&weights, about)?;
    out.artifact(&name, &file, "weights");
    if let Some(a) = ema {
        let averaged = run_dir.join(&ema_file);
        a.save(&averaged)?;
        add_metadata(&averaged, about)?;
        out.artifact(&ema_name, &ema_file, "weights");
    }
    Ok(())
}

/// Adds string entries to a safetensors file's `__metadata__` (what safetensors' `metadata()`
/// and `safe_open(...).metadata()` return), rewriting the header in place atomically; the
/// tensors and their offsets are unchanged.
pub(crate) fn add_metadata(path: &Path, entries: &BTreeMap<String, String>) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(FailureCause::Error, format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let Some(len) = len.filter(|&l| 8 + l <= bytes.len()) else {
        return Err(bad("not a safetensors file".into()));
    };
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| bad(format!("header: {e}")))?;
    let meta = header.entry("__metadata__").or_insert_with(|| serde_json::json!({}));
    for (k, v) in entries {
        meta[k] = serde_json::Value::String(v.clone());
    }
    let mut text = serde_json::to_vec(&header).expect("json");
    // The data that follows starts 8-byte aligned, as safetensors writes it.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let tmp = path.with_extension("meta.tmp");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + len..]);
    std::fs::write(&tmp, out).map_err(|e| bad(e.to_string()))?;
    finish_atomic(&tmp, path)
}

/// Syncs a temporary file, renames it into place and syncs the folder.
pub(crate) fn finish_atomic(tmp: &Path, path: &Path) -> Result<(), Failure> {
    let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
    sync(tmp).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", tmp.display())))?;
    std::fs::rename(tmp, path)
        .map_err(|e| Failure::new(FailureCause::Error, format!("cannot rename {}: {e}", tmp.display())))?;
    if let Some(dir) = path.parent() {
        sync(dir).map_err(|e| Failure::new(FailureCause::Error, format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(())
}
