//! TensorBoard event files: one run folder per job (`EXPERIMENT/STAGE/POINT seed=S.ID`) with
//! its metric series as scalars and its config as hyperparameters (the HParams dashboard), so
//! `tensorboard --logdir DIR` shows a sweep.
//!
//! The format is TensorBoard's own: TFRecord framing (length, masked CRC-32C of the length,
//! data, masked CRC-32C of the data) around `Event` protocol buffers, written here by hand (a
//! few fields of four messages).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use xlab_store::{JobRecord, JobStatus};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 { 0x82f6_3b78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, b| table[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8))
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// A protocol buffer message being written.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn int(mut self, field: u32, v: u64) -> Msg {
        self.key(field, 0);
        self.varint(v);
        self
    }

    fn double(mut self, field: u32, v: f64) -> Msg {
        self.key(field, 1);
        self.0.extend(v.to_le_bytes());
        self
    }

    fn float(mut self, field: u32, v: f32) -> Msg {
        self.key(field, 5);
        self.0.extend(v.to_le_bytes());
        self
    }

    fn bytes(mut self, field: u32, b: &[u8]) -> Msg {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn msg(self, field: u32, m: Msg) -> Msg {
        self.bytes(field, &m.0)
    }
}

/// `tensorboard.hparams` plugin data as a summary value with the given tag.
fn hparams_value(tag: &str, data: Msg) -> Msg {
    let plugin = Msg::default().bytes(1, b"hparams").msg(2, data);
    // The plugin's null tensor: a float scalar with no values (`metadata.NULL_TENSOR`).
    let null_tensor = [0x08, 0x01, 0x12, 0x02, 0x12, 0x00];
    Msg::default().bytes(1, tag.as_bytes()).msg(9, Msg::default().msg(1, plugin)).bytes(8, &null_tensor)
}

/// `google.protobuf.Value` of a hyperparameter.
fn proto_value(v: &serde_json::Value) -> Msg {
    match v {
        serde_json::Value::Number(n) => Msg::default().double(2, n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Msg::default().bytes(3, s.as_bytes()),
        serde_json::Value::Bool(b) => Msg::default().int(4, u64::from(*b)),
        serde_json::Value::Null => Msg::default().int(1, 0),
        other => Msg::default().bytes(3, other.to_string().as_bytes()),
    }
}

/// An event file being written.
struct Events {
    out: std::io::BufWriter<std::fs::File>,
}

impl Events {
    fn create(dir: &Path, wall: f64) -> anyhow::Result<Events> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("events.out.tfevents.{}.xlab", wall as u64));
        let out = std::io::BufWriter::new(
            std::fs::File::create(&path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        );
        let mut e = Events { out };
        e.event(Msg::default().double(1, wall).bytes(3, b"brain.Event:2"))?;
        Ok(e)
    }

    fn event(&mut self, m: Msg) -> anyhow::Result<()> {
        let len = (m.0.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked(crc32c(&len)).to_le_bytes())?;
        self.out.write_all(&m.0)?;
        self.out.write_all(&masked(crc32c(&m.0)).to_le_bytes())?;
        Ok(())
    }

    fn summary(&mut self, wall: f64, step: u64, values: Vec<Msg>) -> anyhow::Result<()> {
        let summary = values.into_iter().fold(Msg::default(), |s, v| s.msg(1, v));
        self.event(Msg::default().double(1, wall).int(2, step).msg(5, summary))
    }
}

fn safe(s: &str) -> String {
    s.replace(['/', '\\'], "_")
}

/// The folder of an experiment's runs under `dir`.
pub fn experiment_folder(dir: &Path, experiment: &str) -> PathBuf {
    dir.join(safe(experiment))
}

/// The run folder of a job under `dir`: experiment, stage, then its sweep point, seed and id.
pub fn run_folder(dir: &Path, rec: &JobRecord) -> PathBuf {
    let point: Vec<String> = rec
        .point
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), String::from)))
        .collect();
    let point = if point.is_empty() { String::new() } else { point.join(",") + " " };
    let name = format!("{point}seed={}.{}", rec.seed, &rec.id[..rec.id.len().min(8)]);
    experiment_folder(dir, &rec.experiment).join(safe(&rec.stage)).join(safe(&name))
}

/// Writes one job's run folder: its hyperparameters (config keys, stage and seed), every metric
/// series as scalars (one event per step), and how it ended.
pub fn write_job(dir: &Path, rec: &JobRecord, series: &xlab_store::Series) -> anyhow::Result<PathBuf> {
    let folder = run_folder(dir, rec);
    let start = rec.attempts.first().map_or(0.0, |a| a.started_unix as f64);
    let end = rec.attempts.last().and_then(|a| a.ended_unix).map_or(start, |t| t as f64);
    let mut ev = Events::create(&folder, start)?;
    let mut hparams = Vec::new();
    super::leaves(&rec.config, "", &mut hparams);
    hparams.push(("stage".into(), rec.stage.clone().into()));
    hparams.push(("seed".into(), rec.seed.into()));
    let mut start_info = Msg::default();
    for (k, v) in &hparams {
        start_info = start_info.msg(1, Msg::default().bytes(1, k.as_bytes()).msg(2, proto_value(v)));
    }
    let start_info = start_info.bytes(4, rec.id.as_bytes()).double(5, start);
    ev.summary(start, 0, vec![hparams_value("_hparams_/session_start_info", Msg::default().msg(3, start_info))])?;
    // Per step, every metric logged at it.
    let mut by_step: BTreeMap<u64, Vec<(&str, f64)>> = BTreeMap::new();
    for (name, points) in series {
        for (step, v) in points {
            by_step.entry(*step).or_default().push((name, *v));
        }
    }
    for (step, values) in by_step {
        let values =
            values.into_iter().map(|(tag, v)| Msg::default().bytes(1, tag.as_bytes()).float(2, v as f32)).collect();
        ev.summary(start, step, values)?;
    }
    let status = match rec.status {
        JobStatus::Done => Some(1),
        JobStatus::Failed => Some(2),
        JobStatus::Running => Some(3),
        _ => None,
    };
    if let Some(status) = status {
        let end_info = Msg::default().int(1, status).double(2, end);
        ev.summary(end, 0, vec![hparams_value("_hparams_/session_end_info", Msg::default().msg(4, end_info))])?;
    }
    ev.out.flush()?;
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_fields_encode_as_protobuf_does() {
        assert_eq!(Msg::default().int(2, 300).0, [0x10, 0xac, 0x02]);
        assert_eq!(Msg::default().bytes(1, b"hi").0, [0x0a, 0x02, b'h', b'i']);
        assert_eq!(Msg::default().float(2, 1.0).0, [0x15, 0, 0, 0x80, 0x3f]);
    }
}
