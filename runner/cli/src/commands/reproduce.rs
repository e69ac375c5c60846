//! `xlab reproduce JOB`: runs a done job again from its stored record, in a fresh store, and
//! says whether its metric series and final files came out bit for bit the same, or by how much
//! they differ.
//!
//! The job is planned again from the experiment's text as stored (so its config, seed and
//! identity are the record's), with the plugins found now; a plugin whose file's SHA-256 is not
//! the one the job ran with is refused, naming both hashes. The jobs it consumes (`needs:`) are
//! not rerun: their records and files are copied into the fresh store, as the inputs they were.

use crate::commands::run::{run_plan_in, ExecutorKind, RunArgs, Shown};
use crate::common::*;
use crate::{plugins, Cli};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use xlab_store::{JobRecord, JobStatus, ResultStore};

#[derive(clap::Args)]
pub struct ReproduceArgs {
    /// The job (its id or a unique prefix of it) in the store `--store` names.
    pub job: String,
    /// Keep the fresh store here (default: a temporary folder, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Where to run it (default: the kind of device it ran on, `cpu` or `cuda`).
    #[arg(long)]
    pub devices: Option<xlab_sched::Devices>,
}

pub fn run(cli: &Cli, args: &ReproduceArgs) -> Result<u8, Failure> {
    let src = existing_store(&cli.store)?;
    let rec = find_job(&src, &args.job)?;
    if rec.status != JobStatus::Done {
        return Err(user_error(format!(
            "job {} is {}: only a done job has results to reproduce\n  hint: `xlab show {}` tells its story",
            rec.id,
            format!("{:?}", rec.status).to_lowercase(),
            short(&rec.id)
        )));
    }
    let exp = named_experiment(&src, &rec.experiment)?;
    // The version of the file that planned the job (the current one, or an earlier one).
    let source = std::iter::once(&exp.source)
        .zip(std::iter::once(&exp.stages))
        .chain(exp.earlier.iter().rev().map(|v| (&v.source, &v.stages)))
        .find(|(_, stages)| stages.iter().any(|s| s.jobs.contains(&rec.id)))
        .map_or(&exp.source, |(s, _)| s);
    let file = PathBuf::from(&exp.file);
    // The text as it ran; relative paths (data, includes, plugins) resolve from where the file was.
    let plan = xlab_plan::load_str(&file, source, &mut plugins::WorkerPlugins::new(worker_path()))?;
    let Some(job) =
        plan.jobs().find(|j| j.id.as_str() == rec.id || j.earlier_id.as_ref().is_some_and(|e| e.as_str() == rec.id))
    else {
        let tpe = plan.stages.iter().any(|s| s.name == rec.stage && s.template.is_some());
        return Err(user_error(if tpe {
            format!(
                "job {} is a trial TPE proposed while the search ran; xlab reproduce reruns jobs the file plans\n  hint: \
                 run the search again with `xlab run` in another store: its proposals are seeded",
                short(&rec.id)
            )
        } else {
            format!(
                "the experiment `{}` as stored no longer plans job {}: a file it reads changed\n  hint: {}",
                exp.name,
                short(&rec.id),
                changed_files(&rec).unwrap_or_else(|| "compare `xlab show JOB --json` with the file".into())
            )
        }));
    };
    // The plugins must be the very files the job ran with.
    for used in &rec.provenance.plugins {
        let now = job.plugins.iter().find(|p| p.id == used.id);
        match now {
            Some(p) if used.sha256.is_empty() || p.sha256 == used.sha256 => {}
            Some(p) => {
                return Err(Failure {
                    code: exit::ENVIRONMENT,
                    error: anyhow::anyhow!(
                    "plugin `{}` changed since job {} ran: it ran with {} {} of sha256 {}, and the plugin found now \
                         ({}) has sha256 {}\n  hint: rebuild the plugin from the commit the job ran with ({}), or put \
                         that build first on XLAB_PLUGIN_PATH",
                    used.id,
                    short(&rec.id),
                    used.file,
                    used.version,
                    used.sha256,
                    p.file,
                    p.sha256,
                    rec.provenance.git_commit.as_deref().unwrap_or("unknown")
                ),
                })
            }
            None => {
                return Err(user_error(format!(
                    "plugin `{}` that job {} ran with is not used by the job as planned now",
                    used.id,
                    short(&rec.id)
                )))
            }
        }
    }
    // The jobs it consumes, with theirs, copied in as they are.
    let by_id: BTreeMap<&str, &xlab_plan::Job> = plan.jobs().map(|j| (j.id.as_str(), j)).collect();
    let mut inputs = BTreeSet::new();
    let mut todo: Vec<&str> = job.parents.iter().map(|p| p.as_str()).collect();
    while let Some(p) = todo.pop() {
        if inputs.insert(p.to_string()) {
            todo.extend(by_id.get(p).into_iter().flat_map(|j| j.parents.iter().map(|q| q.as_str())));
        }
    }
    let (dir, temporary) = match &args.keep {
        Some(d) => {
            if d.join("db").exists() {
                return Err(user_error(format!(
                    "{} already holds a store\n  hint: --keep names a new folder for the rerun",
                    d.display()
                )));
            }
            (d.clone(), false)
        }
        None => (std::env::temp_dir().join(format!("xlab-reproduce-{}-{}", short(&rec.id), std::process::id())), true),
    };
    let result = reproduce_in(&dir, &src, &rec, plan.clone(), &inputs, args);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The files (`{path, sha256}`) of the job's config whose content is not what it was.
fn changed_files(rec: &JobRecord) -> Option<String> {
    let mut found = Vec::new();
    fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        let serde_json::Value::Object(m) = v else { return };
        if let (Some(serde_json::Value::String(p)), Some(serde_json::Value::String(sha))) =
            (m.get("path"), m.get("sha256"))
        {
            let now = std::fs::read(p).map(|b| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&b))
            });
            match now {
                Ok(now) if &now != sha => out.push(format!("`{at}` ({p}) had sha256 {sha} and has {now} now")),
                Err(e) => out.push(format!("`{at}` ({p}) cannot be read: {e}")),
                Ok(_) => {}
            }
            return;
        }
        for (k, v) in m {
            walk(v, &if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
        }
    }
    walk(&rec.config, "", &mut found);
    (!found.is_empty()).then(|| found.join("; "))
}

fn reproduce_in(
    dir: &Path,
    src: &dyn ResultStore,
    rec: &JobRecord,
    mut plan: xlab_plan::Plan,
    inputs: &BTreeSet<String>,
    args: &ReproduceArgs,
) -> Result<u8, Failure> {
    {
        let fresh = open_store(dir)?;
        for id in inputs {
            let parent = src.job(id)?.filter(|p| p.status == JobStatus::Done).ok_or_else(|| {
                user_error(format!(
                    "job {} consumes job {}, which the store does not hold as done",
                    short(&rec.id),
                    short(id)
                ))
            })?;
            fresh.put_job(&parent)?;
            let points = series_by_step(&src.metrics_of(id)?);
            fresh.put_metrics_batch(id, &points)?;
            copy_files(&src.run_dir(id), &fresh.run_dir(id))?;
        }
        fresh.flush()?;
    }
    let keep: BTreeSet<&str> = inputs.iter().map(String::as_str).chain([rec.id.as_str()]).collect();
    for s in &mut plan.stages {
        s.jobs.retain(|j| keep.contains(j.id.as_str()));
        // A search's trial runs to its end here, as it did to be done.
        s.search = None;
        s.template = None;
    }
    plan.stages.retain(|s| !s.jobs.is_empty());
    let device = rec.provenance.device.as_deref().unwrap_or("cpu");
    let devices = match &args.devices {
        Some(d) => d.clone(),
        None => (if device.starts_with("cuda") { "cuda" } else { "cpu" }).parse().map_err(|e: String| user_error(e))?,
    };
    let how = RunArgs {
        jobs: Some(1),
        threads: rec.provenance.threads.unwrap_or(1),
        devices,
        jobs_per_device: 1,
        fail_fast: true,
        max_parallel: None,
        executor: Some(ExecutorKind::Local),
        rerun: None,
        detach: false,
    };
    outln!(
        "reproducing job {} ({} {}seed {}) in {}",
        short(&rec.id),
        rec.stage,
        point_text(rec),
        rec.seed,
        dir.display()
    );
    let code = run_plan_in(dir, plan, &how, Shown { live: false, table: false })?;
    let fresh = existing_store(dir)?;
    let Some(again) = fresh.job(&rec.id)?.filter(|r| r.status == JobStatus::Done) else {
        return Err(Failure {
            code: if code == 0 { exit::JOBS_FAILED } else { code },
            error: anyhow::anyhow!(
                "the rerun of job {} did not finish; its log is under {}",
                short(&rec.id),
                dir.display()
            ),
        });
    };
    let mut same = true;
    let (before, after) = (src.metrics_of(&rec.id)?, fresh.metrics_of(&rec.id)?);
    // Wall-clock measurements (`time.*`) differ between any two runs; everything else must not.
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).filter(|m| !m.starts_with("time.")).collect();
    let mut differing = Vec::new();
    for name in &names {
        let (a, b) =
            (before.get(*name).map(Vec::as_slice).unwrap_or(&[]), after.get(*name).map(Vec::as_slice).unwrap_or(&[]));
        if let Some(d) = series_difference(a, b) {
            differing.push(format!("{name} {d}"));
        }
    }
    let timing = before.keys().filter(|m| m.starts_with("time.")).count();
    let timing =
        if timing > 0 { format!(" ({timing} wall-clock `time.*` series not compared)") } else { String::new() };
    if differing.is_empty() {
        outln!("  metric series: all {} bit-identical{timing}", names.len());
    } else {
        same = false;
        outln!("  metric series: {} of {} differ{timing}", differing.len(), names.len());
        for d in &differing {
            outln!("    {d}");
        }
    }
    for a in rec.artifacts.iter().filter(|a| !a.kind.starts_with("checkpoint")) {
        let Some(b) = again.artifacts.iter().find(|b| b.name == a.name) else {
            same = false;
            outln!("  {} ({}): not written by the rerun", a.name, a.path);
            continue;
        };
        let (x, y) = (std::fs::read(src.dir().join(&a.path)), std::fs::read(fresh.dir().join(&b.path)));
        match (x, y) {
            (Ok(x), Ok(y)) if x == y => {
                outln!("  {} ({}): bit-identical (sha256 {})", a.name, a.path, &sha256(&x)[..16])
            }
            (Ok(x), Ok(y)) => {
                same = false;
                let how = if a.path.ends_with(".safetensors") { tensor_difference(&x, &y) } else { None };
                outln!("  {} ({}): differs{}", a.name, a.path, how.map(|h| format!(": {h}")).unwrap_or_default());
            }
            (Err(e), _) => outln!("  {} ({}): the original is gone ({e}); not compared", a.name, a.path),
            (_, Err(e)) => {
                same = false;
                outln!("  {} ({}): the rerun's file cannot be read ({e})", a.name, a.path);
            }
        }
    }
    if same {
        outln!("result: bit-identical");
        return Ok(0);
    }
    let deterministic = rec.config.get("deterministic").and_then(serde_json::Value::as_bool).unwrap_or(false);
    let mut why = Vec::new();
    if !deterministic {
        why.push("the job did not ask for `deterministic: true`, so reductions may run in another order".to_string());
    }
    let here = again.provenance.device.as_deref().unwrap_or("?");
    if here.split(':').next() != device.split(':').next() {
        why.push(format!("it ran on {device} and was reproduced on {here}"));
    }
    if again.provenance.libtorch != rec.provenance.libtorch {
        why.push(format!(
            "libtorch {} then, {} now",
            rec.provenance.libtorch.as_deref().unwrap_or("?"),
            again.provenance.libtorch.as_deref().unwrap_or("?")
        ));
    }
    outln!("result: differs{}", if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) });
    Ok(exit::JOBS_FAILED)
}

fn point_text(rec: &JobRecord) -> String {
    rec.point.iter().map(|(k, v)| format!("{k}={} ", v.as_str().map_or_else(|| v.to_string(), String::from))).collect()
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A job's series as the points of each step.
fn series_by_step(series: &xlab_store::Series) -> Vec<(u64, BTreeMap<String, f64>)> {
    let mut by: BTreeMap<u64, BTreeMap<String, f64>> = BTreeMap::new();
    for (name, points) in series {
        for (step, v) in points {
            by.entry(*step).or_default().insert(name.clone(), *v);
        }
    }
    by.into_iter().collect()
}

/// Copies a job's folder, all but its checkpoints (its final files are what a child reads).
fn copy_files(from: &Path, to: &Path) -> Result<(), Failure> {
    let env = |e: std::io::Error, p: &Path| Failure {
        code: exit::ENVIRONMENT,
        error: anyhow::anyhow!("cannot copy {}: {e}", p.display()),
    };
    std::fs::create_dir_all(to).map_err(|e| env(e, to))?;
    let Ok(entries) = std::fs::read_dir(from) else { return Ok(()) };
    for e in entries.flatten() {
        let (path, name) = (e.path(), e.file_name());
        if name.to_string_lossy().starts_with("ckpt-") {
            continue;
        }
        if path.is_dir() {
            copy_files(&path, &to.join(&name))?;
        } else {
            std::fs::copy(&path, to.join(&name)).map_err(|e| env(e, &path))?;
        }
    }
    Ok(())
}

/// How two series of one metric differ, or `None` when they are bit for bit the same.
fn series_difference(a: &[(u64, f64)], b: &[(u64, f64)]) -> Option<String> {
    if a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits()) {
        return None;
    }
    if a.iter().map(|p| p.0).ne(b.iter().map(|p| p.0)) {
        return Some(format!("has {} points then and {} now", a.len(), b.len()));
    }
    let mut first = None;
    let mut max = 0f64;
    for (x, y) in a.iter().zip(b) {
        if x.1.to_bits() != y.1.to_bits() {
            first.get_or_insert(x.0);
            max = max.max((x.1 - y.1).abs());
        }
    }
    Some(format!("from step {}: max |Δ| {max:.3e}", first.unwrap_or(0)))
}

/// How two safetensors files' tensors differ: how many, and the largest difference of a value.
fn tensor_difference(a: &[u8], b: &[u8]) -> Option<String> {
    let (ha, da) = safetensors(a)?;
    let (hb, db) = safetensors(b)?;
    let (mut differ, mut total, mut max, mut at) = (0, 0, 0f64, String::new());
    for (name, (dtype, ra)) in &ha {
        total += 1;
        let Some((_, rb)) = hb.get(name) else {
            differ += 1;
            continue;
        };
        let (x, y) = (&da[ra.clone()], &db[rb.clone()]);
        if x == y {
            continue;
        }
        differ += 1;
        let width = match dtype.as_str() {
            "F32" => 4,
            "F64" => 8,
            _ => continue,
        };
        if x.len() != y.len() {
            continue;
        }
        for (p, q) in x.chunks_exact(width).zip(y.chunks_exact(width)) {
            let v = |c: &[u8]| {
                if width == 4 {
                    f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes")))
                } else {
                    f64::from_le_bytes(c.try_into().expect("8 bytes"))
                }
            };
            let d = (v(p) - v(q)).abs();
            if d > max {
                (max, at) = (d, name.clone());
            }
        }
    }
    Some(format!(
        "{differ} of {total} tensors differ, max |Δ| {max:.3e}{}",
        if at.is_empty() { String::new() } else { format!(" (in {at})") }
    ))
}

type Tensors = BTreeMap<String, (String, std::ops::Range<usize>)>;

/// A safetensors file's tensors (dtype, byte range in the data) and its data.
fn safetensors(bytes: &[u8]) -> Option<(Tensors, &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    let data = bytes.get(8 + n..)?;
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let off = t.get("data_offsets")?.as_array()?;
        let (s, e) = (off.first()?.as_u64()? as usize, off.get(1)?.as_u64()? as usize);
        if e > data.len() || s > e {
            return None;
        }
        out.insert(name.clone(), (t.get("dtype")?.as_str()?.to_string(), s..e));
    }
    Some((out, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_say_where_and_how_much() {
        let a = [(1, 0.5), (2, 0.25), (3, 0.125)];
        assert_eq!(series_difference(&a, &a), None);
        let b = [(1, 0.5), (2, 0.25 + 1e-7), (3, 0.125 - 3e-7)];
        assert_eq!(series_difference(&a, &b).unwrap(), "from step 2: max |Δ| 3.000e-7");
        assert_eq!(series_difference(&a, &b[..2]).unwrap(), "has 3 points then and 2 now");
        // -0.0 and 0.0 compare equal as numbers but are not the same bits.
        assert!(series_difference(&[(1, 0.0)], &[(1, -0.0)]).is_some());
    }

    fn safetensors_file(tensors: &[(&str, &[f32])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        out
    }

    #[test]
    fn weights_differences_name_the_tensor() {
        let a = safetensors_file(&[("fc.bias", &[0.5, 1.0]), ("fc.weight", &[1.0, 2.0, 3.0])]);
        let b = safetensors_file(&[("fc.bias", &[0.5, 1.0]), ("fc.weight", &[1.0, 2.25, 3.0])]);
        assert_eq!(tensor_difference(&a, &b).unwrap(), "1 of 2 tensors differ, max |Δ| 2.500e-1 (in fc.weight)");
        assert_eq!(tensor_difference(&a, b"not a file"), None);
    }
}
