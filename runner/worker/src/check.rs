//! `xlab-worker check`: what only running code can find wrong with a job, found before the
//! sweep starts. Each job's data is read (a CSV label or group column that does not exist, an
//! npz without `x` or `y`), its model built, and its components constructed with their
//! parameters; a training job of its own also sets its components up with its data, so an
//! objective that needs groups on data without them is caught. Datasets, models and plugin
//! libraries shared by many jobs are built or loaded once.

use crate::{data, model, train};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use tch::nn;
use xlab_plan::config::{JobConfig, Task};
use xlab_plugin_host::LoadedPlugin;
use xlab_proto::plugins::{CheckFailure, JobCheck};

/// Every failure, at most one per job (the first thing wrong with it).
pub fn check(jobs: &[JobCheck]) -> Vec<CheckFailure> {
    let mut checker = Checker::default();
    jobs.iter()
        .enumerate()
        .filter_map(|(index, job)| {
            // A panic in a plugin's constructor or in libtorch is a finding, not a crash.
            let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker.job(job)))
                .unwrap_or_else(|p| Err((String::new(), crate::failure_of_panic(&*p).message)));
            found.err().map(|(key, message)| CheckFailure { index, key, message })
        })
        .collect()
}

#[derive(Default)]
struct Checker {
    datasets: HashMap<String, Result<Rc<data::Dataset>, String>>,
    models: HashMap<String, Result<(), String>>,
    libs: HashMap<String, Result<Rc<LoadedPlugin>, String>>,
}

type Found = Result<(), (String, String)>;

impl Checker {
    fn job(&mut self, job: &JobCheck) -> Found {
        let cfg: JobConfig =
            serde_json::from_value(job.config.clone()).map_err(|e| (String::new(), format!("job config: {e}")))?;
        let classifier = matches!(cfg.task, Task::Train | Task::Evaluate) && cfg.diffusion.is_none();
        let data = if classifier { Some(self.data(&cfg).map_err(|m| ("data".to_string(), m))?) } else { None };
        let trains_alone = cfg.task == Task::Train && !job.has_parents;
        if let (Some(d), Some(m @ xlab_plan::config::ModelConfig::Torchscript(t)), Task::Train) =
            (&cfg.diffusion, &cfg.model, cfg.task)
        {
            // A TorchScript denoiser: it loads, and answers the job's rows in their shape.
            let data = self.data(&cfg).map_err(|m| ("data".to_string(), m))?;
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let classes = d.conditional.then_some(data.classes);
            let net = crate::denoiser::DiffusionNet::build(&vs.root(), m, data.input_dim, data.image, classes)
                .map_err(|e| ("model".to_string(), e))?;
            net.check_script(data.input_dim, &t.path.path).map_err(|e| ("model".to_string(), e))?;
        }
        if let (Some(d), Some(m), true) = (&data, &cfg.model, trains_alone) {
            self.model(m, d).map_err(|e| ("model".to_string(), e))?;
        }
        let info = match (&data, trains_alone) {
            (Some(d), true) => {
                Some(train::run_info(&cfg, d, job.seed, &[]).map_err(|f| ("data".to_string(), f.message))?)
            }
            _ => None,
        };
        for (slot, c) in cfg.components() {
            let at = |m: String| (slot.to_string(), m);
            let mut lib = None;
            for p in &job.plugins {
                let l = self.lib(&p.file).map_err(at)?;
                if l.info.components.iter().any(|k| k.id == c.id) {
                    lib = Some(l);
                    break;
                }
            }
            let lib = lib.ok_or_else(|| at(format!("no plugin of the job provides `{}`", c.id)))?;
            let mut inst = lib.instantiate(&c.id, &serde_json::Value::Object(c.params.clone())).map_err(at)?;
            if let Some(info) = &info {
                inst.setup(info).map_err(|m| {
                    let why = m.strip_prefix(&format!("`{}` setup: ", c.id)).unwrap_or(&m);
                    at(format!("`{}` cannot train on this job's data: {why}", c.id))
                })?;
            }
        }
        Ok(())
    }

    fn data(&mut self, cfg: &JobConfig) -> Result<Rc<data::Dataset>, String> {
        let key = serde_json::to_string(&cfg.data).expect("data configs serialize");
        let key = format!("{key}/{:?}", cfg.task);
        self.datasets.entry(key).or_insert_with(|| data::build_for(cfg.task, &cfg.data).map(Rc::new)).clone()
    }

    fn model(&mut self, m: &xlab_plan::config::ModelConfig, d: &data::Dataset) -> Result<(), String> {
        if m.is_diffusion() {
            return Err("a diffusion model trains with `diffusion:`".into());
        }
        let key = format!(
            "{}|{}|{:?}|{}",
            serde_json::to_string(m).expect("model configs serialize"),
            d.input_dim,
            d.image,
            d.classes
        );
        self.models
            .entry(key)
            .or_insert_with(|| {
                let vs = nn::VarStore::new(tch::Device::Cpu);
                model::build_checked(&vs.root(), m, d.input_dim, d.image, d.classes).map(|_| ())
            })
            .clone()
    }

    fn lib(&mut self, file: &str) -> Result<Rc<LoadedPlugin>, String> {
        self.libs
            .entry(file.to_string())
            .or_insert_with(|| {
                xlab_plugin_host::load(Path::new(file)).map(Rc::new).map_err(|m| format!("plugin {file}: {m}"))
            })
            .clone()
    }
}
