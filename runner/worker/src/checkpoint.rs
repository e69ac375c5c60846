//! Checkpoints: everything a job needs to continue exactly where it stopped.
//!
//! A checkpoint after epoch E is two files in the job's run folder:
//! - `ckpt-00000E.safetensors`: model weights (`model.<name>`, PyTorch names), optimizer state
//!   (`optim.<name>.<buffer>`) and plugin tensors (`plugin.<slot>.<name>`);
//! - `ckpt-00000E.json`: epoch, step counters, the plugins' random stream position, every
//!   plugin's JSON state, the metrics so far, and the size and SHA-256 of the tensor file.
//!
//! Both are written atomically (temporary file, fsync, rename, fsync of the folder), the JSON
//! last: it is the commit point. A reader takes the newest JSON whose tensor file matches its
//! recorded size and hash, so a truncated or corrupt checkpoint falls back to the one before.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const FORMAT: u32 = 1;
/// How many checkpoints a job keeps.
pub const KEEP: usize = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: u32,
    pub job_id: String,
    /// Epochs completed.
    pub epoch: u64,
    pub global_step: u64,
    pub optimizer_steps: u64,
    /// Position of the plugins' random stream (ChaCha8 word position), as a decimal string.
    pub plugin_rng_word_pos: String,
    /// JSON state of each plugin component, by slot.
    pub plugins: BTreeMap<String, serde_json::Value>,
    /// Metrics reported so far: (step, values).
    #[serde(with = "xlab_proto::floats::json")]
    pub metrics: Vec<(u64, BTreeMap<String, f64>)>,
    /// Batches done in epoch `epoch + 1` when the checkpoint was taken inside it (0: at the
    /// end of epoch `epoch`); the epoch's order and example verdicts are then tensors
    /// `state.order` and `state.verdict`.
    #[serde(default)]
    pub step_in_epoch: u64,
    /// The epoch's statistics so far, for a checkpoint inside an epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
    /// `precision: fp16`: the loss scale and its count of finite steps in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(with = "xlab_proto::floats::json")]
    pub loss_scale: Option<(f32, u32)>,
    /// `ema:`: the average's update count (its tensors are `ema.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_updates: Option<u64>,
    pub tensors_file: String,
    pub tensors_bytes: u64,
    pub tensors_sha256: String,
}

/// The host-side sums of an epoch's statistics (see the training loop's `EpochStats`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PartialEpoch {
    #[serde(with = "xlab_proto::floats::json")]
    pub loss_sum: f64,
    #[serde(with = "xlab_proto::floats::json")]
    pub correct: f64,
    pub seen: usize,
    pub steps: u64,
    pub passes: u64,
    #[serde(with = "xlab_proto::floats::json")]
    pub plugin: BTreeMap<String, (f64, u32)>,
    #[serde(with = "xlab_proto::floats::json")]
    pub groups: Vec<(f64, f64, f64)>,
}

pub struct Checkpoint {
    pub meta: Meta,
    pub tensors: Vec<(String, Tensor)>,
}

use xlab_proto::artifacts::{check_tensor_file, checkpoint_points as list, CheckpointPoint};

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically. A failed write (a full disk) leaves no partial file
/// behind, so it takes no room from what comes after.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes a checkpoint and removes all but the newest [`KEEP`].
pub fn save(dir: &Path, mut meta: Meta, tensors: &[(String, Tensor)]) -> Result<PathBuf, String> {
    let name = CheckpointPoint { epoch: meta.epoch, step: meta.step_in_epoch }.stem();
    let tensor_path = dir.join(format!("{name}.safetensors"));
    let tmp = dir.join(format!("{name}.safetensors.tmp"));
    let refs: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu))).collect();
    let cleanup = |m: String| {
        let _ = std::fs::remove_file(&tmp);
        m
    };
    Tensor::write_safetensors(&refs, &tmp).map_err(|e| cleanup(format!("cannot write {}: {e}", tmp.display())))?;
    let bytes = std::fs::read(&tmp).map_err(|e| cleanup(format!("cannot read back {}: {e}", tmp.display())))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| cleanup(format!("cannot sync {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &tensor_path).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))?;
    meta.tensors_file = format!("{name}.safetensors");
    meta.tensors_bytes = bytes.len() as u64;
    meta.tensors_sha256 = hex::encode(Sha256::digest(&bytes));
    let json_path = dir.join(format!("{name}.json"));
    write_atomic(&json_path, &serde_json::to_vec_pretty(&meta).expect("meta serializes"))
        .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
    for old in list(dir).into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(dir.join(format!("{}.json", old.stem())));
        let _ = std::fs::remove_file(dir.join(format!("{}.safetensors", old.stem())));
    }
    Ok(json_path)
}

/// The newest valid checkpoint of `job_id` in `dir`; invalid ones are reported in `skipped`.
pub fn latest(dir: &Path, job_id: &str, skipped: &mut Vec<String>) -> Option<Checkpoint> {
    for point in list(dir) {
        match load(dir, point, job_id) {
            Ok(c) => return Some(c),
            Err(why) => skipped.push(format!("{}: {why}", point.stem())),
        }
    }
    None
}

fn load(dir: &Path, point: CheckpointPoint, job_id: &str) -> Result<Checkpoint, String> {
    let json = std::fs::read(dir.join(format!("{}.json", point.stem()))).map_err(|e| e.to_string())?;
    let meta: Meta = serde_json::from_slice(&json).map_err(|e| format!("unreadable: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("format {} (this worker reads {FORMAT})", meta.format));
    }
    if meta.job_id != job_id {
        return Err(format!("belongs to job {}", meta.job_id));
    }
    check_tensor_file(dir, &meta.tensors_file, meta.tensors_bytes, &meta.tensors_sha256)?;
    let path = dir.join(&meta.tensors_file);
    let tensors = Tensor::read_safetensors(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Checkpoint { meta, tensors })
}
