//! The conformance kit every plugin's tests run, and small exact hosts for test vectors.
//!
//! `conformance(path)` loads a built plugin library through the real loader and checks, for each
//! component: the handshake, that its parameter defaults satisfy its own schema, construction
//! with defaults, a state save/load round trip, determinism under a fixed seed, and output
//! shapes for its kind.

use crate::{self as host, Instance, LoadedPlugin, StepDriver};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use xlab_plugin_api::sdk::{RunInfo, Sampling};
use xlab_plugin_api::{tch, ComponentKind};
use xlab_proto::plugins::{resolve_params, ComponentInfo};

/// Finds a workspace plugin library built next to the running test: `lib<crate>.so` in the
/// test's folder or its parent (cargo puts test binaries in `target/<profile>/deps/`).
pub fn built_plugin(lib_name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps folder");
    let file = format!("lib{lib_name}.so");
    for dir in [deps.to_path_buf(), deps.parent().map(Path::to_path_buf).unwrap_or_default()] {
        let p = dir.join(&file);
        if p.exists() {
            return p;
        }
    }
    panic!("{file} not found next to {}: build the workspace first (`make build`)", exe.display());
}

/// The Python the reference tests run: `XLAB_PYTHON`, or the project's `.venv` that
/// `make setup` creates (with torch, scikit-learn and diffusers).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("XLAB_PYTHON") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup` (or set XLAB_PYTHON to a Python with torch)", p.display());
    p
}

/// Runs a reference script with `python()`: the request as JSON on its stdin, its JSON answer
/// from stdout; a failing script fails the test with its stderr.
pub fn run_python_reference(script: &Path, request: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python().display()));
    child.stdin.take().expect("piped stdin").write_all(request.to_string().as_bytes()).expect("request written");
    let out = child.wait_with_output().expect("reference finished");
    assert!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: not JSON: {e}", script.display()))
}

/// A deterministic stream for tests (splitmix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// An exact host for step rules: parameters `w_k` (float64), loss `Σ_k ½ wₖᵀ diag(a_k) wₖ`,
/// and plain SGD as the base optimizer.
pub struct QuadraticDriver {
    pub params: Vec<Tensor>,
    pub curvature: Vec<Tensor>,
    pub names: Vec<String>,
    pub tags: Vec<u32>,
    pub lr: f64,
    pub passes: u32,
    pub frozen_passes: u32,
    frozen: bool,
    rng: SplitMix,
    pub logged: Vec<(String, f64)>,
    /// Gradients seen at each pass, for checking intermediate vectors.
    pub grads_seen: Vec<Vec<Vec<f64>>>,
}

impl QuadraticDriver {
    /// One parameter tensor per `(name, w, a)`.
    pub fn new(params: &[(&str, &[f64], &[f64])], lr: f64) -> Self {
        let mut d = QuadraticDriver {
            params: vec![],
            curvature: vec![],
            names: vec![],
            tags: vec![],
            lr,
            passes: 0,
            frozen_passes: 0,
            frozen: false,
            rng: SplitMix(7),
            logged: vec![],
            grads_seen: vec![],
        };
        for (name, w, a) in params {
            d.params.push(Tensor::from_slice(w).set_requires_grad(true));
            d.curvature.push(Tensor::from_slice(a));
            d.names.push(name.to_string());
            let tag = if name.contains("bn") || name.contains("norm") {
                xlab_plugin_api::abi::tags::NORM
            } else if name.ends_with("bias") {
                xlab_plugin_api::abi::tags::BIAS
            } else {
                xlab_plugin_api::abi::tags::WEIGHT
            };
            d.tags.push(tag);
        }
        d
    }

    pub fn weights(&self) -> Vec<Vec<f64>> {
        self.params.iter().map(to_vec).collect()
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a numeric tensor")
}

impl StepDriver for QuadraticDriver {
    fn forward_backward(&mut self) -> Result<f64, String> {
        self.passes += 1;
        if self.frozen {
            self.frozen_passes += 1;
        }
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let terms: Vec<Tensor> =
            self.params.iter().zip(&self.curvature).map(|(w, a)| (a * w * w).sum(Kind::Double) * 0.5).collect();
        let loss = Tensor::stack(&terms, 0).sum(Kind::Double);
        loss.backward();
        self.grads_seen.push(self.params.iter().map(|p| to_vec(&p.grad())).collect());
        f64::try_from(&loss).map_err(|e| e.to_string())
    }
    fn n_params(&self) -> usize {
        self.params.len()
    }
    fn param(&mut self, i: usize) -> (&mut Tensor, &str, u32) {
        (&mut self.params[i], &self.names[i], self.tags[i])
    }
    fn optimizer_step(&mut self) -> Result<(), String> {
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.grad();
                let _ = p.f_sub_(&(g * self.lr)).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
    fn freeze_norm_stats(&mut self, frozen: bool) {
        self.frozen = frozen;
    }
    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    fn log(&mut self, name: &str, value: f64) {
        self.logged.push((name.to_string(), value));
    }
}

/// Instantiates a component with its defaults overridden by `params` (checked like the
/// coordinator checks them).
pub fn instantiate(plugin: &LoadedPlugin, id: &str, params: serde_json::Value) -> Instance {
    let info = component(plugin, id);
    let given = params.as_object().cloned().unwrap_or_default();
    let resolved = resolve_params(info, &given).unwrap_or_else(|e| panic!("{id}: {e:?}"));
    plugin.instantiate(id, &serde_json::Value::Object(resolved)).unwrap_or_else(|e| panic!("{id}: {e}"))
}

fn component<'a>(plugin: &'a LoadedPlugin, id: &str) -> &'a ComponentInfo {
    plugin.info.components.iter().find(|c| c.id == id).unwrap_or_else(|| panic!("no component {id}"))
}

/// The run every component is set up with: 8 examples, 3 classes, 2 groups, and one finished
/// parent job (2 epochs) whose run folder holds the training-pass errors a training job leaves.
fn run_info() -> RunInfo {
    let run_dir = std::env::temp_dir().join(format!("xlab-conformance-{}", std::process::id())).join("parent");
    for (epoch, errors) in [(1u64, vec![0u64, 3, 5]), (2, vec![3, 6])] {
        let path = xlab_plugin_api::artifacts::train_errors_path(&run_dir, epoch);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("conformance parent folder");
        let record = xlab_plugin_api::artifacts::TrainErrors { epoch, n_train: 8, errors };
        std::fs::write(&path, serde_json::to_vec(&record).expect("json")).expect("conformance parent errors");
    }
    RunInfo {
        num_classes: 3,
        n_train: 8,
        group_counts: vec![4, 4],
        train_labels: vec![0, 1, 2, 0, 1, 2, 0, 1],
        train_groups: vec![0, 1, 0, 1, 0, 1, 0, 1],
        train_domains: vec![1, 1, 0, 0, 1, 0, 0, 1],
        epochs: 2,
        steps_per_epoch: 2,
        seed: 0,
        parents: vec![xlab_plugin_api::ParentRef {
            job_id: "0123456789abcdef".into(),
            run_dir,
            config: serde_json::json!({"task": "train", "epochs": 2}),
        }],
        // The test batch's 4 features as a 1×2×2 image.
        image: Some([1, 2, 2]),
    }
}

fn state_eq(a: &(serde_json::Value, Vec<(String, Tensor)>), b: &(serde_json::Value, Vec<(String, Tensor)>)) -> bool {
    a.0 == b.0 && a.1.len() == b.1.len() && a.1.iter().zip(&b.1).all(|(x, y)| x.0 == y.0 && x.1.equal(&y.1))
}

/// A host model for objectives: logits = x·W (W `[4, 3]`, fixed), its one variable shared.
pub struct LinearModel {
    pub w: Tensor,
    x: Tensor,
    pub logged: Vec<(String, f64)>,
}

impl LinearModel {
    pub fn new(x: &Tensor) -> Self {
        let w = (Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([4, 3]) / 5.0).cos();
        LinearModel { w, x: x.shallow_clone(), logged: vec![] }
    }
}

impl host::ObjectiveDriver for LinearModel {
    fn log(&mut self, name: &str, value: f64) {
        self.logged.push((name.to_string(), value));
    }
    fn model_state(&mut self) -> Vec<(String, Tensor)> {
        vec![("w".to_string(), self.w.shallow_clone())]
    }
    fn forward_with(&mut self, vars: &[Tensor]) -> Result<Tensor, String> {
        let [w] = vars else { return Err(format!("{} tensors for one variable", vars.len())) };
        Ok(tch::no_grad(|| self.x.matmul(w)))
    }
}

/// A fixed small batch: 6 examples, 4 features, 3 classes, 2 groups.
fn batch() -> (Tensor, Tensor, Tensor, Tensor) {
    let x = Tensor::arange(24, (Kind::Float, tch::Device::Cpu)).reshape([6, 4]) / 10.0;
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    let g = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1]);
    let idx = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5]);
    (x, y, g, idx)
}

/// The conformance kit's model for transforms that query one: logits x·W of 64-pixel images,
/// whose features are the pixels; the validation split is the training set.
struct LinearHost {
    /// The training images and their labels; the batch is the first six, with labels `y`.
    train: Tensor,
    labels: Tensor,
    y: Tensor,
    w: Tensor,
    asked: u32,
    mix: Option<(Tensor, Tensor, Tensor)>,
}

impl host::TransformModel for LinearHost {
    fn input_grad(&mut self, weight: f64, _train: bool, _keep: bool) -> Result<Tensor, String> {
        self.asked += 1;
        let xv = self.train.narrow(0, 0, 6).detach().set_requires_grad(true);
        let loss =
            xv.matmul(&self.w).cross_entropy_loss::<Tensor>(&self.y, None, tch::Reduction::Mean, -100, 0.0) * weight;
        Ok(Tensor::run_backward(&[&loss], &[&xv], false, false).remove(0))
    }
    fn validation(&mut self) -> Result<(Tensor, Tensor, Tensor), String> {
        self.asked += 1;
        let pred = self.train.matmul(&self.w).argmax(-1, false);
        Ok((self.train.shallow_clone(), pred, self.labels.shallow_clone()))
    }
    fn head(&mut self, features: &Tensor) -> Result<Tensor, String> {
        Ok(features.to_kind(Kind::Float).matmul(&self.w))
    }
    fn rows(&mut self, index: &Tensor) -> Result<Tensor, String> {
        self.asked += 1;
        Ok(self.train.index_select(0, index))
    }
    fn feature_mix(&mut self, partner: &Tensor, mu: &Tensor, index: &Tensor) -> Result<(), String> {
        self.asked += 1;
        self.mix = Some((partner.shallow_clone(), mu.to_kind(Kind::Double), index.shallow_clone()));
        Ok(())
    }
}

/// A classification transform's output: rows agree, one target column per class summing to 1,
/// the input shape kept.
fn check_transformed(id: &str, x: &Tensor, xo: &Tensor, t: &Tensor) {
    assert_eq!(xo.size()[0], t.size()[0], "{id}: inputs and targets disagree on the batch size");
    assert_eq!(t.size()[1], 3, "{id}: targets must have one column per class");
    assert_eq!(xo.size()[1..], x.size()[1..], "{id}: the input shape changed");
    let sums = to_vec(&t.sum_dim_intlist(1, false, Kind::Double));
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{id}: target rows must sum to 1: {sums:?}");
}

/// What the conformance kit tells a component about the run: image data (1×8×8) for a
/// transform that queries the model, the plain run otherwise.
fn info_for(inst: &Instance) -> RunInfo {
    let info = run_info();
    if inst.queries_model {
        RunInfo { image: Some([1, 8, 8]), ..info }
    } else {
        info
    }
}

/// Exercises one component: a few calls of its kind, returning what it produced.
fn exercise(inst: &mut Instance, seed: u64) -> Vec<Vec<f64>> {
    let (x, y, g, idx) = batch();
    let mut rng = SplitMix(seed);
    match inst.kind {
        ComponentKind::StepRule => {
            let mut d = QuadraticDriver::new(
                &[("layer.weight", &[3.0, 4.0], &[1.0, 2.0]), ("bn.weight", &[1.0, -1.0], &[1.0, 1.0])],
                0.1,
            );
            for s in 0..3 {
                inst.step(&mut d, 0, s).unwrap_or_else(|e| panic!("step: {e}"));
            }
            d.weights()
        }
        ComponentKind::BatchTransform if inst.noise => {
            // The batch's inputs are noise: what forms x_t and the target keep its shape.
            let (xo, t) = inst
                .transform(&x, &y, Some(&g), Some(&g), &idx, 3, &mut || rng.next_u64())
                .unwrap_or_else(|e| panic!("transform: {e}"));
            assert_eq!(xo.size(), x.size(), "{}: the noise's shape changed", inst.id);
            assert_eq!(t.size(), x.size(), "{}: the target must be shaped like the noise", inst.id);
            vec![to_vec(&xo), to_vec(&t)]
        }
        ComponentKind::BatchTransform if inst.queries_model => {
            // The run's eight 1×8×8 training images (the batch is the first six) and a linear
            // model, whose features are the pixels, that the transform may query.
            let train = (Tensor::arange(8 * 64, (Kind::Float, tch::Device::Cpu)).reshape([8, 64]) * 0.37).sin();
            let x = train.narrow(0, 0, 6);
            let w = (Tensor::arange(64 * 3, (Kind::Float, tch::Device::Cpu)).reshape([64, 3]) * 0.11).cos();
            let labels = Tensor::from_slice(&run_info().train_labels);
            let mut model = LinearHost { train, labels, y: y.shallow_clone(), w, asked: 0, mix: None };
            let (xo, t) = inst
                .transform_with(&x, &y, Some(&g), Some(&g), &idx, 3, &mut || rng.next_u64(), Some(&mut model))
                .unwrap_or_else(|e| panic!("transform: {e}"));
            assert!(model.asked > 0, "{}: declares that it queries the model but never did", inst.id);
            check_transformed(&inst.id, &x, &xo, &t);
            let mut out = vec![to_vec(&xo), to_vec(&t)];
            if let Some((p, mu, i)) = model.mix {
                assert_eq!(p.size(), xo.size(), "{}: one partner per row", inst.id);
                out.extend([to_vec(&p), to_vec(&mu), to_vec(&i.to_kind(Kind::Double))]);
            }
            out
        }
        ComponentKind::BatchTransform => {
            let (xo, t) = inst
                .transform(&x, &y, Some(&g), Some(&g), &idx, 3, &mut || rng.next_u64())
                .unwrap_or_else(|e| panic!("transform: {e}"));
            check_transformed(&inst.id, &x, &xo, &t);
            vec![to_vec(&xo), to_vec(&t)]
        }
        ComponentKind::Objective => {
            let losses = Tensor::from_slice(&[0.5f32, 1.0, 1.5, 2.0, 0.25, 0.75]).set_requires_grad(true);
            let correct = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0, 1.0, 1.0]);
            let logits = (Tensor::arange(18, (Kind::Float, tch::Device::Cpu)).reshape([6, 3]) / 7.0).sin();
            let mut model = LinearModel::new(&x);
            let loss = inst
                .objective_full(&losses, &correct, Some(&g), &idx, Some(&logits), true, &mut model)
                .unwrap_or_else(|e| panic!("objective: {e}"));
            assert_eq!(loss.dim(), 0, "{}: the training loss must be a scalar", inst.id);
            loss.backward();
            assert!(losses.grad().defined(), "{}: the loss must depend on the per-example losses", inst.id);
            let sampling = match inst.sampling(0, 8).unwrap_or_else(|e| panic!("sampling: {e}")) {
                Sampling::Uniform => vec![],
                Sampling::Weighted(w) => w,
                Sampling::Repeat(c) => c.into_iter().map(f64::from).collect(),
            };
            vec![to_vec(&loss), to_vec(&losses.grad()), sampling]
        }
        ComponentKind::Sampler => {
            let t = 1000;
            let betas = Tensor::linspace(1e-4, 0.02, t, (Kind::Double, tch::Device::Cpu));
            let ac = (-betas + 1.0).cumprod(0, Kind::Double);
            let noise = Tensor::from_slice(&[0.3f64, -1.2, 0.7, 2.0]).reshape([2, 2]);
            // ε̂ of the single data point x₀* = 0.5: exact, so every sampler should land there.
            let oracle = |ac: &Tensor, x: &Tensor, t: f64| -> Result<Tensor, String> {
                let i = (t.round() as i64).clamp(0, 999);
                let a: f64 = f64::try_from(ac.get(i)).map_err(|e| e.to_string())?;
                Ok((x - a.sqrt() * 0.5) / (1.0 - a).sqrt())
            };
            let (ac2, ac3) = (ac.shallow_clone(), ac.shallow_clone());
            let mut eps = move |x: &Tensor, t: f64| oracle(&ac2, x, t);
            // With and without a condition (self-guiding samplers): the same point.
            let mut both = move |x: &Tensor, t: f64| -> Result<(Tensor, Tensor), String> {
                let e = oracle(&ac3, x, t)?;
                Ok((e.shallow_clone(), e))
            };
            // The same point as the training set, for samplers that read it.
            let data = Tensor::from_slice(&[0.5f64, 0.5]).reshape([1, 2]);
            let (out, nfe) = inst
                .sample_with(&noise, &mut eps, Some(&mut both), &ac, Some(&data), &mut || rng.next_u64())
                .unwrap_or_else(|e| panic!("sample: {e}"));
            assert_eq!(out.size(), noise.size(), "{}: samples must have the noise's shape", inst.id);
            assert!(nfe > 0, "{}: a sampler must evaluate the denoiser", inst.id);
            vec![to_vec(&out), vec![nfe as f64]]
        }
        ComponentKind::Guidance => {
            let cond = Tensor::from_slice(&[1.0f64, 0.0, 0.5, -0.5]).reshape([2, 2]);
            let uncond = Tensor::from_slice(&[0.8f64, 0.2, 0.4, -0.1]).reshape([2, 2]);
            let (out, next) = inst.guide(&cond, Some(&uncond)).unwrap_or_else(|e| panic!("guide: {e}"));
            assert_eq!(out.size(), cond.size(), "{}: guidance must keep the prediction's shape", inst.id);
            // The host passes ε_u again exactly when the guidance asked for it.
            let (alone, _) = inst.guide(&cond, next.then_some(&uncond)).unwrap_or_else(|e| panic!("second guide: {e}"));
            assert_eq!(alone.size(), cond.size(), "{}: guidance must keep the prediction's shape", inst.id);
            vec![to_vec(&out), to_vec(&alone)]
        }
        ComponentKind::Attention => {
            let pos = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 3.0, 2.0, 1.0]).reshape([1, 2, 3]);
            let neg = Tensor::from_slice(&[0.5f64, -1.0, 1.5, 2.0, 1.8, 1.1]).reshape([1, 2, 3]);
            let mut outs = Vec::new();
            // The start and the end of the schedule: either the output or Z⁺ kept.
            for t in [999.0, 0.0] {
                let z = inst.attend(&pos, &neg, t, 999.0).unwrap_or_else(|e| panic!("attend: {e}"));
                let z = z.unwrap_or_else(|| pos.shallow_clone());
                assert_eq!(z.size(), pos.size(), "{}: attention guidance must keep the output's shape", inst.id);
                outs.push(to_vec(&z));
            }
            outs
        }
    }
}

/// Runs the conformance checks on every component of the plugin at `path`.
pub fn conformance(path: &Path) -> LoadedPlugin {
    let plugin = host::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!plugin.info.id.is_empty() && !plugin.info.version.is_empty(), "a plugin needs an id and a version");
    assert_eq!(plugin.info.sha256.len(), 64);
    assert!(!plugin.info.components.is_empty(), "a plugin provides at least one component");
    for c in &plugin.info.components {
        let family = c.id.split('.').next().unwrap_or_default();
        assert_eq!(family, plugin.info.id, "component `{}` must be named `{}.<variant>`", c.id, plugin.info.id);
        assert!(!c.summary.is_empty() && !c.reference.is_empty(), "{}: summary and reference are required", c.id);
        // The schema round-trips and its defaults satisfy it.
        let json = serde_json::to_string(&c.params).unwrap();
        assert_eq!(serde_json::from_str::<Vec<xlab_proto::plugins::ParamSpec>>(&json).unwrap(), c.params);
        let defaults = resolve_params(c, &Default::default())
            .unwrap_or_else(|e| panic!("{}: defaults violate the schema: {e:?}", c.id));
        // Every parameter is filled in, except those added later, which stay out at their
        // default: the component must then take its default itself (`#[serde(default)]`),
        // as the instantiation with `{}` below checks.
        assert_eq!(defaults.len(), c.params.iter().filter(|p| !p.added_later).count());
        for p in &c.params {
            assert!(!p.doc.is_empty(), "{}: parameter `{}` needs a one-line doc", c.id, p.name);
        }
        // Construction with defaults, setup, and unknown parameters refused by the component itself.
        let mut a = instantiate(&plugin, &c.id, serde_json::json!({}));
        a.setup(&info_for(&a)).unwrap_or_else(|e| panic!("{e}"));
        let mut bad = defaults.clone();
        bad.insert("no_such_parameter".into(), serde_json::json!(1));
        assert!(
            plugin.instantiate(&c.id, &serde_json::Value::Object(bad)).is_err(),
            "{}: unknown parameters must be refused",
            c.id
        );
        // Determinism under a fixed seed, from fresh instances.
        let mut b = instantiate(&plugin, &c.id, serde_json::json!({}));
        b.setup(&info_for(&b)).unwrap();
        let out_a = exercise(&mut a, 11);
        let out_b = exercise(&mut b, 11);
        assert_eq!(out_a, out_b, "{}: not deterministic under a fixed seed", c.id);
        // State round trip: save, load into a fresh instance, save again.
        let saved = a.save_state().unwrap_or_else(|e| panic!("{e}"));
        if !c.stateful {
            assert!(saved.0.is_null() && saved.1.is_empty(), "{}: declared stateless but has state", c.id);
        }
        let mut fresh = instantiate(&plugin, &c.id, serde_json::json!({}));
        fresh.setup(&info_for(&fresh)).unwrap();
        fresh.load_state(&saved.0, &saved.1).unwrap_or_else(|e| panic!("{e}"));
        let again = fresh.save_state().unwrap();
        assert!(state_eq(&saved, &again), "{}: state changed across save/load", c.id);
        // A restored instance continues exactly like the original.
        assert_eq!(exercise(&mut a, 5), exercise(&mut fresh, 5), "{}: a restored instance behaves differently", c.id);
    }
    plugin
}
