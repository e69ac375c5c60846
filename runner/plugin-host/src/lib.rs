//! The host side of the plugin boundary: finding, checking and loading plugin libraries, and
//! calling their components through the C ABI. Used by the worker (the coordinator only sees the
//! JSON description) and by plugins' tests, through [`testing`], the conformance kit. A plugin
//! library links only `xlab-plugin-api`, the author's side.

pub mod testing;

use sha2::{Digest, Sha256};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use tch::Tensor;
use xlab_plugin_api::abi::{self, ComponentDecl, ComponentKind, PluginManifest, RStr, Sink, Status};
use xlab_plugin_api::sdk::{vec_sink, RunInfo, Sampling};
use xlab_plugin_api::tch;
use xlab_proto::plugins::{ComponentInfo, ParamSpec, PluginInfo, Refusal, Registry};

/// A loaded, checked plugin library. Libraries are never unloaded.
pub struct LoadedPlugin {
    pub info: PluginInfo,
    manifest: &'static PluginManifest,
}

// SAFETY: the manifest is immutable static data inside a library that is never unloaded.
unsafe impl Send for LoadedPlugin {}
// SAFETY: as above.
unsafe impl Sync for LoadedPlugin {}

fn rstr(s: RStr, what: &str) -> Result<String, String> {
    // SAFETY: manifest strings point into the library's static data, which is never unloaded.
    unsafe { s.as_str() }.map(str::to_string).map_err(|e| format!("{what} is not UTF-8: {e}"))
}

/// A manifest's plugin id when it is short, non-empty UTF-8 of an id's characters; `None` for
/// anything else (a manifest of an unknown layout may hold anything there).
fn plugin_name(s: RStr) -> Option<String> {
    if s.ptr.is_null() || s.len == 0 || s.len > 64 {
        return None;
    }
    // SAFETY: every ABI version's manifest has the id here, pointing into the library's static data.
    let id = unsafe { s.as_str() }.ok()?;
    id.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)).then(|| id.to_string())
}

/// Loads a plugin library and checks its manifest; the error says what is wrong and what to do.
pub fn load(path: &Path) -> Result<LoadedPlugin, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    check_elf(&bytes)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    // SAFETY: loading runs the library's initializers. Plugins are code the user chose to run;
    // the ELF check above keeps arbitrary files out.
    // dlopen searches the library path for a name without a slash (`fixture.so`): give it the
    // file itself.
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let lib = unsafe { libloading::Library::new(&abs) }.map_err(|e| format!("cannot load: {e}"))?;
    // SAFETY: the symbol's type is fixed by the ABI; a wrong type would have a wrong name.
    let entry: abi::EntryFn = match unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) } {
        Ok(f) => *f,
        Err(_) => return Err(
            "not an xlab plugin: it does not export `xlab_plugin_manifest_v1` (use `xlab_plugin_api::export_plugin!`)"
                .into(),
        ),
    };
    // SAFETY: the entry point takes no arguments and returns a pointer to static data or null.
    let manifest = unsafe { entry() };
    if manifest.is_null() {
        return Err("the plugin's manifest could not be built (its entry point panicked)".into());
    }
    // SAFETY: non-null and static (the library stays loaded: `lib` is leaked below).
    let manifest: &'static PluginManifest = unsafe { &*manifest };
    // `abi_version` and `plugin_id` open the manifest in every ABI version, so a plugin built
    // for another one is still named; the id is read only if it looks like one.
    let name = || match plugin_name(manifest.plugin_id) {
        Some(id) => format!("plugin `{id}`"),
        None => "the plugin".to_string(),
    };
    if manifest.abi_version != abi::ABI_VERSION {
        return Err(format!(
            "{} was built for plugin ABI v{}, but this xlab speaks v{}; rebuild it against this xlab's xlab-plugin-api",
            name(),
            manifest.abi_version,
            abi::ABI_VERSION
        ));
    }
    if manifest.layout_hash != abi::LAYOUT_HASH {
        return Err(format!(
            "{} was built against another layout of plugin ABI v{} (layout {:#018x}, this xlab's {:#018x}): an \
             xlab-plugin-api from another commit; rebuild it against this xlab",
            name(),
            abi::ABI_VERSION,
            manifest.layout_hash,
            abi::LAYOUT_HASH
        ));
    }
    let torch = rstr(manifest.torch_version, "torch version")?;
    if torch != abi::TORCH_VERSION {
        return Err(format!(
            "built against libtorch {torch}, but this worker runs libtorch {}; rebuild the plugin with tch =0.24.0",
            abi::TORCH_VERSION
        ));
    }
    let id = rstr(manifest.plugin_id, "plugin id")?;
    let version = rstr(manifest.plugin_version, "plugin version")?;
    let mut components = Vec::new();
    for i in 0..manifest.n_components {
        // SAFETY: the manifest's array holds n_components declarations.
        let d = unsafe { &*manifest.components.add(i) };
        let cid = rstr(d.id, "component id")?;
        let kind =
            ComponentKind::from_u32(d.kind).ok_or_else(|| format!("component `{cid}` has unknown kind {}", d.kind))?;
        if !valid_component_id(&cid) {
            return Err(format!(
                "component id `{cid}` is not of the form `family.variant` (lowercase letters, digits, _)"
            ));
        }
        let has_entry = match kind {
            ComponentKind::StepRule => d.step.is_some(),
            ComponentKind::BatchTransform => d.transform.is_some(),
            ComponentKind::Objective => d.objective.is_some(),
            ComponentKind::Sampler => d.sample.is_some(),
            ComponentKind::Guidance => d.guide.is_some(),
            ComponentKind::Attention => d.attend.is_some(),
        };
        if !has_entry {
            return Err(format!("component `{cid}` is a {} but has no {} function", kind.as_str(), kind.as_str()));
        }
        let params: Vec<ParamSpec> = serde_json::from_str(&rstr(d.params_json, "parameter schema")?)
            .map_err(|e| format!("component `{cid}`: bad parameter schema: {e}"))?;
        components.push(ComponentInfo {
            kind: kind.as_str().into(),
            id: cid,
            summary: rstr(d.summary, "summary")?,
            reference: rstr(d.reference, "reference")?,
            params,
            passes_per_step: d.passes_per_step,
            stateful: d.flags & abi::flags::STATEFUL != 0,
            random: d.flags & abi::flags::RANDOM != 0,
            noise: d.flags & abi::flags::NOISE != 0,
            inverts: d.flags & abi::flags::INVERTS != 0,
            guides: d.flags & abi::flags::GUIDES != 0,
        });
    }
    std::mem::forget(lib);
    let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    Ok(LoadedPlugin { info: PluginInfo { id, version, file, sha256, components }, manifest })
}

/// Checks the ELF headers before `dlopen` sees the file: a truncated library makes the dynamic
/// loader read past the end of its mapping and kills the process with SIGBUS, so a short file
/// must be refused here, with a message.
fn check_elf(b: &[u8]) -> Result<(), String> {
    if b.len() < 4 || &b[..4] != b"\x7fELF" {
        return Err("not a shared library (no ELF header); is the file truncated or corrupt?".into());
    }
    let truncated =
        || "truncated or corrupt shared library (its headers point past the end of the file); rebuild it".to_string();
    if b.len() < 64 {
        return Err(truncated());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian library; build the plugin for this machine".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| -> Option<usize> {
        b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")) as usize)
    };
    if u16_at(16) != 3 {
        return Err("an ELF file but not a shared library (e_type is not ET_DYN); build the plugin as a cdylib".into());
    }
    const EM_X86_64: usize = 62;
    const EM_AARCH64: usize = 183;
    let machine = u16_at(18);
    let here = if cfg!(target_arch = "x86_64") { EM_X86_64 } else { EM_AARCH64 };
    if machine != here {
        return Err(format!("built for another processor (ELF machine {machine}); build the plugin on this machine"));
    }
    let phoff = u64_at(32).ok_or_else(truncated)?;
    let shoff = u64_at(40).ok_or_else(truncated)?;
    let (phentsize, phnum, shentsize, shnum) = (u16_at(54), u16_at(56), u16_at(58), u16_at(60));
    let end = |off: usize, n: usize, size: usize| off.checked_add(n.checked_mul(size)?);
    if end(phoff, phnum, phentsize).is_none_or(|e| e > b.len())
        || end(shoff, shnum, shentsize).is_none_or(|e| e > b.len())
    {
        return Err(truncated());
    }
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_offset = u64_at(ph + 8).ok_or_else(truncated)?;
        let p_filesz = u64_at(ph + 32).ok_or_else(truncated)?;
        if p_offset.checked_add(p_filesz).is_none_or(|e| e > b.len()) {
            return Err(truncated());
        }
    }
    Ok(())
}

fn valid_component_id(id: &str) -> bool {
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    matches!(id.split_once('.'), Some((a, b)) if ok(a) && ok(b))
}

/// Plugin library files in a folder: `libxlab_plugin_*.so`.
pub fn plugin_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("libxlab_plugin_") && name.ends_with(".so")
        })
        .collect();
    files.sort();
    files
}

/// Loads every plugin from the given folders and files. Libraries that cannot be used, and
/// second providers of an id already taken, are listed as refused with the reason.
pub fn discover(dirs: &[PathBuf], files: &[PathBuf]) -> (Vec<LoadedPlugin>, Registry) {
    let mut candidates: Vec<PathBuf> = dirs.iter().flat_map(|d| plugin_files_in(d)).collect();
    candidates.extend(files.iter().cloned());
    let mut seen_paths = std::collections::HashSet::new();
    let mut loaded: Vec<LoadedPlugin> = Vec::new();
    let mut registry = Registry::default();
    for path in candidates {
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if !seen_paths.insert(canon) {
            continue;
        }
        let file = path.display().to_string();
        match load(&path) {
            Err(reason) => registry.refused.push(Refusal { file, reason }),
            Ok(p) => {
                let clash = loaded.iter().find_map(|q| {
                    if q.info.id == p.info.id {
                        return Some(format!("duplicate plugin id `{}`: {} provides it too", p.info.id, q.info.file));
                    }
                    p.info.components.iter().find_map(|c| {
                        q.info
                            .components
                            .iter()
                            .any(|d| d.id == c.id)
                            .then(|| format!("duplicate component id `{}`: {} provides it too", c.id, q.info.file))
                    })
                });
                match clash {
                    Some(reason) => registry.refused.push(Refusal { file, reason }),
                    None => {
                        registry.plugins.push(p.info.clone());
                        loaded.push(p);
                    }
                }
            }
        }
    }
    (loaded, registry)
}

/// Who is told when a plugin call starts and ends: the worker's watch over its steps, which
/// names the call a crash or a hang happened in.
static CALL_LISTENER: std::sync::OnceLock<fn(Option<&str>)> = std::sync::OnceLock::new();
/// The plugin calls in progress, innermost last (an objective called from a step rule's pass).
static CALLS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Has `f` told of every plugin call: `Some(label)` (e.g. "`sam.sam` step") when one starts,
/// and the call that is then innermost, or `None`, when one ends. The first listener stays.
pub fn on_plugin_calls(f: fn(Option<&str>)) {
    let _ = CALL_LISTENER.set(f);
}

/// Runs a call that may write an error message, turning its status into a `Result`.
fn call(what: &str, f: impl FnOnce(*const Sink) -> Status) -> Result<(), String> {
    let mut msg = Vec::new();
    let sink = vec_sink(&mut msg);
    let listener = CALL_LISTENER.get();
    if let Some(tell) = listener {
        let mut calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        calls.push(what.to_string());
        tell(Some(what));
    }
    let status = f(&sink);
    if let Some(tell) = listener {
        let mut calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        calls.pop();
        tell(calls.last().map(String::as_str));
    }
    match status {
        Status::Ok => Ok(()),
        Status::Panic => Err(format!("{what} panicked: {}", String::from_utf8_lossy(&msg))),
        Status::Unsupported => Err(format!("{what} is not supported by this component")),
        Status::Error => Err(format!("{what}: {}", String::from_utf8_lossy(&msg))),
    }
}

/// The worker's side of a step: what a step rule's callbacks do.
/// What an objective may ask of the host besides its inputs.
pub trait ObjectiveDriver {
    fn log(&mut self, name: &str, value: f64);
    /// The model's variables (parameters and buffers), in a fixed order.
    fn model_state(&mut self) -> Vec<(String, Tensor)> {
        vec![]
    }
    /// Logits of the pass's inputs from the model with `vars` in place of its variables, in
    /// evaluation mode, without gradient.
    fn forward_with(&mut self, _vars: &[Tensor]) -> Result<Tensor, String> {
        Err("this host cannot run its model for an objective".into())
    }
}

/// A host with no model: objectives can only log.
struct LogOnly<'a>(&'a mut dyn FnMut(&str, f64));

impl ObjectiveDriver for LogOnly<'_> {
    fn log(&mut self, name: &str, value: f64) {
        (self.0)(name, value)
    }
}

/// The context behind an `ObjectiveHost`: the driver, and the model state handed out (kept
/// alive for the duration of the call).
struct ObjCtx<'a> {
    driver: &'a mut dyn ObjectiveDriver,
    state: Option<Vec<(String, Tensor)>>,
}

mod obj_tramp {
    use super::*;
    fn c<'a>(ctx: *mut c_void) -> &'a mut ObjCtx<'a> {
        // SAFETY: ctx is the ObjCtx set up by `Instance::objective_full`.
        unsafe { &mut *(ctx as *mut ObjCtx<'a>) }
    }
    pub unsafe extern "C" fn log(ctx: *mut c_void, name: RStr, value: f64) {
        // SAFETY: the plugin passes a valid string for the duration of the call.
        if let Ok(n) = unsafe { name.as_str() } {
            c(ctx).driver.log(n, value)
        }
    }
    fn state<'a>(cx: &'a mut ObjCtx<'_>) -> &'a [(String, Tensor)] {
        if cx.state.is_none() {
            cx.state = Some(cx.driver.model_state());
        }
        cx.state.as_deref().unwrap_or_default()
    }
    pub unsafe extern "C" fn n_state(ctx: *mut c_void) -> usize {
        state(c(ctx)).len()
    }
    pub unsafe extern "C" fn get_state(ctx: *mut c_void, i: usize, out: *mut abi::ParamRef) -> Status {
        let Some((name, t)) = state(c(ctx)).get(i) else { return Status::Error };
        // SAFETY: out is valid; the handle and name live until the objective call returns.
        unsafe { *out = abi::ParamRef { tensor: t.as_ptr() as *mut c_void, name: RStr::borrowed(name), tags: 0 } };
        Status::Ok
    }
    pub unsafe extern "C" fn forward_with(
        ctx: *mut c_void,
        tensors: *const *mut c_void,
        n: usize,
        out: *mut *mut c_void,
        err: *const Sink,
    ) -> Status {
        // SAFETY: the plugin passes n borrowed handles valid during the call.
        let vars: Vec<Tensor> = (0..n).map(|i| unsafe { Tensor::clone_from_ptr((*tensors.add(i)).cast()) }).collect();
        // SAFETY: out and err are valid during the call.
        unsafe { hand_over(c(ctx).driver.forward_with(&vars), out, err) }
    }
}

pub trait StepDriver {
    fn forward_backward(&mut self) -> Result<f64, String>;
    /// Rows in the current batch.
    fn batch_size(&self) -> usize {
        1
    }
    /// A pass on rows `lo..hi` only; a host without rows supports the whole batch alone.
    fn forward_backward_rows(&mut self, lo: usize, hi: usize) -> Result<f64, String> {
        if lo == 0 && hi == self.batch_size() {
            self.forward_backward()
        } else {
            Err(format!("this host cannot run a pass on rows {lo}..{hi} of a batch of {}", self.batch_size()))
        }
    }
    fn n_params(&self) -> usize;
    /// Parameter `i`: tensor, name, tags.
    fn param(&mut self, i: usize) -> (&mut Tensor, &str, u32);
    fn optimizer_step(&mut self) -> Result<(), String>;
    fn freeze_norm_stats(&mut self, frozen: bool);
    fn next_u64(&mut self) -> u64;
    fn log(&mut self, name: &str, value: f64);
}

/// A live component instance.
/// What answers a sampler's request for the conditional and unconditional predictions at once.
pub type BothFn<'a> = &'a mut dyn FnMut(&Tensor, f64) -> Result<(Tensor, Tensor), String>;

pub struct Instance {
    obj: *mut c_void,
    decl: &'static ComponentDecl,
    pub id: String,
    pub kind: ComponentKind,
    /// A batch transform of diffusion training (`abi::flags::NOISE`).
    pub noise: bool,
    /// A batch transform that queries the model (`abi::flags::MODEL`).
    pub queries_model: bool,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: obj was created by this declaration's create and is destroyed once.
        unsafe { (self.decl.destroy)(self.obj) }
    }
}

/// The model as a host lets a batch transform query it (see [`abi::TransformHost`]). A closure
/// `(weight, train, keep) -> ∂L/∂x` is a model that answers the input gradient only.
pub trait TransformModel {
    fn input_grad(&mut self, weight: f64, train: bool, keep: bool) -> Result<Tensor, String>;
    /// Features `[N, d]`, predicted classes and labels of the validation split.
    fn validation(&mut self) -> Result<(Tensor, Tensor, Tensor), String> {
        Err("this host gives no validation split to a batch transform".into())
    }
    /// The classifier head's logits for features, in evaluation mode.
    fn head(&mut self, _features: &Tensor) -> Result<Tensor, String> {
        Err("this host runs no classifier head for a batch transform".into())
    }
    /// The inputs of training examples by index.
    fn rows(&mut self, _index: &Tensor) -> Result<Tensor, String> {
        Err("this host gives no training rows to a batch transform".into())
    }
    /// The returned batch mixes in feature space with these partners and weights.
    fn feature_mix(&mut self, _partner: &Tensor, _mu: &Tensor, _index: &Tensor) -> Result<(), String> {
        Err("this host cannot mix features".into())
    }
}

impl<F: FnMut(f64, bool, bool) -> Result<Tensor, String>> TransformModel for F {
    fn input_grad(&mut self, weight: f64, train: bool, keep: bool) -> Result<Tensor, String> {
        self(weight, train, keep)
    }
}

mod transform_tramp {
    use super::*;
    fn m<'a>(ctx: *mut c_void) -> &'a mut dyn TransformModel {
        // SAFETY: ctx is the `&mut dyn TransformModel` set up by `Instance::transform_with`,
        // valid during the transform call.
        unsafe { &mut **(ctx as *mut &mut dyn TransformModel) }
    }
    fn borrowed(p: *mut c_void) -> Result<Tensor, String> {
        // SAFETY: a non-null handle the plugin passes in is valid during the call.
        (!p.is_null()).then(|| unsafe { Tensor::clone_from_ptr(p.cast()) }).ok_or_else(|| "a null tensor".to_string())
    }
    pub unsafe extern "C" fn input_grad(
        ctx: *mut c_void,
        weight: f64,
        train: bool,
        keep: bool,
        out: *mut *mut c_void,
        err: *const Sink,
    ) -> Status {
        // SAFETY: out and err are valid during the call.
        unsafe { hand_over(m(ctx).input_grad(weight, train, keep), out, err) }
    }
    pub unsafe extern "C" fn validation(
        ctx: *mut c_void,
        features: *mut *mut c_void,
        pred: *mut *mut c_void,
        labels: *mut *mut c_void,
        err: *const Sink,
    ) -> Status {
        let r = m(ctx).validation().map(|(f, p, l)| {
            for (t, out) in [(f, features), (p, pred), (l, labels)] {
                // SAFETY: the out-pointers are valid during the call.
                unsafe { hand_over(Ok(t), out, err) };
            }
        });
        report(r, err)
    }
    /// `head` and `rows`: one borrowed tensor in, one owned tensor out.
    fn tensor_to_tensor(
        input: *mut c_void,
        out: *mut *mut c_void,
        err: *const Sink,
        f: impl FnOnce(&Tensor) -> Result<Tensor, String>,
    ) -> Status {
        // SAFETY: out and err are valid during the host call this serves.
        unsafe { hand_over(borrowed(input).and_then(|t| f(&t)), out, err) }
    }
    pub unsafe extern "C" fn head(
        ctx: *mut c_void,
        input: *mut c_void,
        out: *mut *mut c_void,
        err: *const Sink,
    ) -> Status {
        tensor_to_tensor(input, out, err, |f| m(ctx).head(f))
    }
    pub unsafe extern "C" fn rows(
        ctx: *mut c_void,
        input: *mut c_void,
        out: *mut *mut c_void,
        err: *const Sink,
    ) -> Status {
        tensor_to_tensor(input, out, err, |i| m(ctx).rows(i))
    }
    pub unsafe extern "C" fn feature_mix(
        ctx: *mut c_void,
        partner: *mut c_void,
        mu: *mut c_void,
        index: *mut c_void,
        err: *const Sink,
    ) -> Status {
        let r = (|| {
            let (p, u, i) = (borrowed(partner)?, borrowed(mu)?, borrowed(index)?);
            m(ctx).feature_mix(&p, &u, &i)
        })();
        report(r, err)
    }
}

unsafe extern "C" fn rng_trampoline(ctx: *mut c_void) -> u64 {
    // SAFETY: ctx is the `&mut dyn FnMut() -> u64` set up by the caller below.
    let f = unsafe { &mut *(ctx as *mut &mut dyn FnMut() -> u64) };
    f()
}

/// A host callback's answer to the plugin: an owned handle in `out`, or the message in `err`.
///
/// # Safety
/// `out` must be writable and `err` null or a valid sink.
unsafe fn hand_over(r: Result<Tensor, String>, out: *mut *mut c_void, err: *const Sink) -> Status {
    let r = r.map(|t| {
        let mut owned = t.shallow_clone();
        // SAFETY: guaranteed by the caller; the plugin owns the handle from here.
        unsafe { *out = owned.as_mut_ptr().cast() };
        std::mem::forget(owned);
    });
    report(r, err)
}

/// A host callback's status: `Ok`, or the message written to `err` and `Error`.
fn report(r: Result<(), String>, err: *const Sink) -> Status {
    match r {
        Ok(()) => Status::Ok,
        Err(m) => {
            err_to_sink(err, &m);
            Status::Error
        }
    }
}

fn err_to_sink(err: *const Sink, msg: &str) {
    if !err.is_null() {
        // SAFETY: the plugin passes a valid sink for the duration of the call.
        unsafe { ((*err).write)((*err).ctx, msg.as_ptr(), msg.len()) }
    }
}

mod step_tramp {
    use super::*;
    type Ctx<'a> = &'a mut dyn StepDriver;
    fn d<'a>(ctx: *mut c_void) -> &'a mut dyn StepDriver {
        // SAFETY: ctx is the `&mut dyn StepDriver` set up by `Instance::step`.
        unsafe { &mut **(ctx as *mut Ctx<'a>) }
    }
    pub unsafe extern "C" fn forward_backward(ctx: *mut c_void, out: *mut abi::PassOut, err: *const Sink) -> Status {
        match d(ctx).forward_backward() {
            Ok(loss) => {
                // SAFETY: out is a valid out-pointer from the plugin.
                unsafe { (*out).loss = loss };
                Status::Ok
            }
            Err(m) => {
                err_to_sink(err, &m);
                Status::Error
            }
        }
    }
    pub unsafe extern "C" fn forward_backward_rows(
        ctx: *mut c_void,
        lo: u64,
        hi: u64,
        out: *mut abi::PassOut,
        err: *const Sink,
    ) -> Status {
        let drv = d(ctx);
        if lo >= hi || hi as usize > drv.batch_size() {
            err_to_sink(err, &format!("rows {lo}..{hi} are not a non-empty range of a batch of {}", drv.batch_size()));
            return Status::Error;
        }
        match drv.forward_backward_rows(lo as usize, hi as usize) {
            Ok(loss) => {
                // SAFETY: out is a valid out-pointer from the plugin.
                unsafe { (*out).loss = loss };
                Status::Ok
            }
            Err(m) => {
                err_to_sink(err, &m);
                Status::Error
            }
        }
    }
    pub unsafe extern "C" fn n_params(ctx: *mut c_void) -> usize {
        d(ctx).n_params()
    }
    pub unsafe extern "C" fn param(ctx: *mut c_void, i: usize, out: *mut abi::ParamRef) -> Status {
        let drv = d(ctx);
        if i >= drv.n_params() {
            return Status::Error;
        }
        let (t, name, tags) = drv.param(i);
        // SAFETY: out is valid; the handle and name live as long as the driver (the whole step).
        unsafe { *out = abi::ParamRef { tensor: t.as_mut_ptr().cast(), name: RStr::borrowed(name), tags } };
        Status::Ok
    }
    pub unsafe extern "C" fn optimizer_step(ctx: *mut c_void, err: *const Sink) -> Status {
        match d(ctx).optimizer_step() {
            Ok(()) => Status::Ok,
            Err(m) => {
                err_to_sink(err, &m);
                Status::Error
            }
        }
    }
    pub unsafe extern "C" fn freeze(ctx: *mut c_void, frozen: bool) {
        d(ctx).freeze_norm_stats(frozen)
    }
    pub unsafe extern "C" fn rng(ctx: *mut c_void) -> u64 {
        d(ctx).next_u64()
    }
    pub unsafe extern "C" fn log(ctx: *mut c_void, name: RStr, value: f64) {
        // SAFETY: the plugin passes a valid string for the duration of the call.
        if let Ok(n) = unsafe { name.as_str() } {
            d(ctx).log(n, value)
        }
    }
}

fn borrow(t: Option<&Tensor>) -> *mut c_void {
    t.map(|t| t.as_ptr() as *mut c_void).unwrap_or(std::ptr::null_mut())
}

fn take(p: *mut c_void, what: &str) -> Result<Tensor, String> {
    if p.is_null() {
        return Err(format!("the component returned no {what}"));
    }
    // SAFETY: the plugin handed over an owned handle.
    Ok(unsafe { Tensor::from_ptr(p.cast()) })
}

impl LoadedPlugin {
    /// Creates an instance of one of this plugin's components with fully resolved parameters.
    pub fn instantiate(&self, component: &str, params: &serde_json::Value) -> Result<Instance, String> {
        let decl = (0..self.manifest.n_components)
            // SAFETY: the array holds n_components declarations and is static.
            .map(|i| unsafe { &*self.manifest.components.add(i) })
            .find(|d| rstr(d.id, "id").is_ok_and(|id| id == component))
            .ok_or_else(|| format!("plugin `{}` has no component `{component}`", self.info.id))?;
        let kind = ComponentKind::from_u32(decl.kind).expect("checked at load");
        let text = serde_json::to_string(params).expect("json");
        let mut obj = std::ptr::null_mut();
        // SAFETY: create is the declaration's constructor; text outlives the call.
        call(&format!("creating `{component}`"), |err| unsafe { (decl.create)(RStr::borrowed(&text), &mut obj, err) })?;
        let noise = decl.flags & abi::flags::NOISE != 0;
        let queries_model = decl.flags & abi::flags::MODEL != 0;
        Ok(Instance { obj, decl, id: component.to_string(), kind, noise, queries_model })
    }
}

impl Instance {
    pub fn setup(&mut self, info: &RunInfo) -> Result<(), String> {
        let text = serde_json::to_string(info).expect("json");
        // SAFETY: obj is live; the string outlives the call.
        call(&format!("`{}` setup", self.id), |err| unsafe { (self.decl.setup)(self.obj, RStr::borrowed(&text), err) })
    }

    pub fn on_epoch(&mut self, epoch: u64) -> Result<(), String> {
        // SAFETY: obj is live.
        call(&format!("`{}` epoch hook", self.id), |err| unsafe { (self.decl.on_epoch)(self.obj, epoch, err) })
    }

    /// The component's state: JSON and named tensors (copies the host owns).
    pub fn save_state(&mut self) -> Result<(serde_json::Value, Vec<(String, Tensor)>), String> {
        struct Acc(Vec<(String, Tensor)>);
        unsafe extern "C" fn tensor(ctx: *mut c_void, name: RStr, t: *mut c_void) {
            // SAFETY: ctx is the Acc below; the handle is borrowed, so take our own reference.
            let acc = unsafe { &mut *(ctx as *mut Acc) };
            let name = unsafe { name.as_str() }.unwrap_or("?").to_string();
            acc.0.push((name, unsafe { Tensor::clone_from_ptr(t.cast()) }.copy()));
        }
        let mut json = Vec::new();
        let mut acc = Acc(Vec::new());
        let out = abi::StateOut { json: vec_sink(&mut json), ctx: (&mut acc as *mut Acc).cast(), tensor };
        // SAFETY: obj is live; `out` and what it points to outlive the call.
        call(&format!("`{}` save_state", self.id), |err| unsafe { (self.decl.save_state)(self.obj, &out, err) })?;
        let v = if json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&json).map_err(|e| e.to_string())?
        };
        Ok((v, acc.0))
    }

    pub fn load_state(&mut self, json: &serde_json::Value, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let text = serde_json::to_string(json).expect("json");
        let names: Vec<RStr> = tensors.iter().map(|(n, _)| RStr::borrowed(n)).collect();
        let handles: Vec<*mut c_void> = tensors.iter().map(|(_, t)| t.as_ptr() as *mut c_void).collect();
        let st = abi::StateIn {
            json: RStr::borrowed(&text),
            n_tensors: tensors.len(),
            names: names.as_ptr(),
            tensors: handles.as_ptr(),
        };
        // SAFETY: obj is live; everything `st` points to outlives the call.
        call(&format!("`{}` load_state", self.id), |err| unsafe { (self.decl.load_state)(self.obj, &st, err) })
    }

    /// Runs one optimizer step of a step rule.
    pub fn step(&mut self, driver: &mut dyn StepDriver, epoch: u64, step: u64) -> Result<(), String> {
        let f = self.decl.step.ok_or_else(|| format!("`{}` is not a step rule", self.id))?;
        let driver_batch = driver.batch_size();
        let mut ctx: &mut dyn StepDriver = driver;
        let c = (&mut ctx as *mut &mut dyn StepDriver).cast::<c_void>();
        let host = abi::StepHost {
            ctx: c,
            forward_backward: step_tramp::forward_backward,
            n_params: step_tramp::n_params,
            param: step_tramp::param,
            optimizer_step: step_tramp::optimizer_step,
            freeze_norm_stats: step_tramp::freeze,
            rng: abi::Rng { ctx: c, next_u64: step_tramp::rng },
            log_metric: step_tramp::log,
            epoch,
            step,
            batch_size: driver_batch as u64,
            forward_backward_rows: step_tramp::forward_backward_rows,
        };
        // SAFETY: obj is live; `host` and the driver outlive the call.
        call(&format!("`{}` step", self.id), |err| unsafe { f(self.obj, &host, err) })
    }

    /// Rewrites a batch; returns the new inputs and soft targets.
    #[allow(clippy::too_many_arguments)]
    pub fn transform(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        group: Option<&Tensor>,
        domain: Option<&Tensor>,
        index: &Tensor,
        num_classes: i64,
        next_u64: &mut dyn FnMut() -> u64,
    ) -> Result<(Tensor, Tensor), String> {
        self.transform_with(x, y, group, domain, index, num_classes, next_u64, None)
    }

    /// As [`Self::transform`], with the model the transform may query (see [`TransformModel`]
    /// and [`abi::TransformHost`]).
    #[allow(clippy::too_many_arguments)]
    pub fn transform_with(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        group: Option<&Tensor>,
        domain: Option<&Tensor>,
        index: &Tensor,
        num_classes: i64,
        next_u64: &mut dyn FnMut() -> u64,
        model: Option<&mut dyn TransformModel>,
    ) -> Result<(Tensor, Tensor), String> {
        let f = self.decl.transform.ok_or_else(|| format!("`{}` is not a batch transform", self.id))?;
        let mut model = model;
        let host = model.as_mut().map(|g| abi::TransformHost {
            ctx: (g as *mut &mut dyn TransformModel).cast(),
            input_grad: transform_tramp::input_grad,
            validation: transform_tramp::validation,
            head: transform_tramp::head,
            rows: transform_tramp::rows,
            feature_mix: transform_tramp::feature_mix,
        });
        let mut io = abi::BatchIo {
            x: borrow(Some(x)),
            y: borrow(Some(y)),
            group: borrow(group),
            domain: borrow(domain),
            index: borrow(Some(index)),
            num_classes,
            x_out: std::ptr::null_mut(),
            target_out: std::ptr::null_mut(),
            host: host.as_ref().map_or(std::ptr::null(), |h| h as *const abi::TransformHost),
        };
        let mut r: &mut dyn FnMut() -> u64 = next_u64;
        let rng = abi::Rng { ctx: (&mut r as *mut &mut dyn FnMut() -> u64).cast(), next_u64: rng_trampoline };
        // SAFETY: obj is live; io, rng, the host and the tensors outlive the call.
        let res = call(&format!("`{}` transform", self.id), |err| unsafe { f(self.obj, &mut io, &rng, err) });
        let x_out = take(io.x_out, "inputs");
        let t_out = take(io.target_out, "targets");
        res?;
        Ok((x_out?, t_out?))
    }

    /// Turns per-example losses into the training loss.
    pub fn objective(
        &mut self,
        losses: &Tensor,
        correct: &Tensor,
        group: Option<&Tensor>,
        index: &Tensor,
        first_pass: bool,
        log: &mut dyn FnMut(&str, f64),
    ) -> Result<Tensor, String> {
        self.objective_with_logits(losses, correct, group, index, None, first_pass, log)
    }

    /// As [`Self::objective`], also handing the objective the batch's logits.
    #[allow(clippy::too_many_arguments)]
    pub fn objective_with_logits(
        &mut self,
        losses: &Tensor,
        correct: &Tensor,
        group: Option<&Tensor>,
        index: &Tensor,
        logits: Option<&Tensor>,
        first_pass: bool,
        log: &mut dyn FnMut(&str, f64),
    ) -> Result<Tensor, String> {
        self.objective_full(losses, correct, group, index, logits, first_pass, &mut LogOnly(log))
    }

    /// As [`Self::objective_with_logits`], with a host that can also show the objective its
    /// model's state and run the model with other weights.
    #[allow(clippy::too_many_arguments)]
    pub fn objective_full(
        &mut self,
        losses: &Tensor,
        correct: &Tensor,
        group: Option<&Tensor>,
        index: &Tensor,
        logits: Option<&Tensor>,
        first_pass: bool,
        driver: &mut dyn ObjectiveDriver,
    ) -> Result<Tensor, String> {
        let f = self.decl.objective.ok_or_else(|| format!("`{}` is not an objective", self.id))?;
        let mut io = abi::ObjectiveIo {
            losses: borrow(Some(losses)),
            correct: borrow(Some(correct)),
            group: borrow(group),
            index: borrow(Some(index)),
            logits: borrow(logits),
            loss_out: std::ptr::null_mut(),
        };
        let mut cx = ObjCtx { driver, state: None };
        let host = abi::ObjectiveHost {
            ctx: (&mut cx as *mut ObjCtx<'_>).cast(),
            log_metric: obj_tramp::log,
            first_pass,
            n_model_state: obj_tramp::n_state,
            model_state: obj_tramp::get_state,
            forward_with: obj_tramp::forward_with,
        };
        // SAFETY: obj is live; io, host and the tensors outlive the call.
        let res = call(&format!("`{}` objective", self.id), |err| unsafe { f(self.obj, &mut io, &host, err) });
        let out = take(io.loss_out, "loss");
        res?;
        out
    }

    /// How an objective chooses `epoch`'s examples out of `n` training examples.
    pub fn sampling(&mut self, epoch: u64, n: usize) -> Result<Sampling, String> {
        let Some(f) = self.decl.epoch_sampling else { return Ok(Sampling::Uniform) };
        let mut buf = vec![0.0f64; n];
        let mut mode = abi::sampling::UNIFORM;
        // SAFETY: obj is live; buf holds n f64s and outlives the call.
        call(&format!("`{}` epoch sampling", self.id), |err| unsafe {
            f(self.obj, epoch, buf.as_mut_ptr(), n, &mut mode, err)
        })?;
        let s = match mode {
            abi::sampling::UNIFORM => Sampling::Uniform,
            abi::sampling::WEIGHTED => Sampling::Weighted(buf),
            abi::sampling::REPEAT => {
                if let Some(bad) = buf.iter().find(|k| k.fract() != 0.0 || **k < 0.0 || **k > f64::from(u32::MAX)) {
                    return Err(format!("`{}` epoch sampling: repeat count {bad} is not a count", self.id));
                }
                Sampling::Repeat(buf.iter().map(|&k| k as u32).collect())
            }
            other => return Err(format!("`{}` epoch sampling: unknown mode {other}", self.id)),
        };
        s.check(n).map_err(|m| format!("`{}` epoch sampling: {m}", self.id))?;
        Ok(s)
    }

    /// One guided evaluation (see `abi::GuideIo`): the prediction the sampler sees, and whether
    /// the next evaluation needs the unconditional prediction.
    pub fn guide(&mut self, eps_cond: &Tensor, eps_uncond: Option<&Tensor>) -> Result<(Tensor, bool), String> {
        let f = self.decl.guide.ok_or_else(|| format!("`{}` is not a guidance", self.id))?;
        let mut io = abi::GuideIo {
            eps_cond: borrow(Some(eps_cond)),
            eps_uncond: borrow(eps_uncond),
            eps_out: std::ptr::null_mut(),
            need_uncond_next: true,
        };
        // SAFETY: obj is live; io and the tensors outlive the call.
        let res = call(&format!("`{}` guidance", self.id), |err| unsafe { f(self.obj, &mut io, err) });
        let out = take(io.eps_out, "guided prediction");
        res?;
        Ok((out?, io.need_uncond_next))
    }

    /// One cross-attention layer's output under an attention guidance (see `abi::AttendIo`):
    /// `None` keeps Z⁺.
    pub fn attend(&mut self, z_pos: &Tensor, z_neg: &Tensor, t: f64, t_max: f64) -> Result<Option<Tensor>, String> {
        let f = self.decl.attend.ok_or_else(|| format!("`{}` is not an attention guidance", self.id))?;
        let mut io = abi::AttendIo {
            z_pos: borrow(Some(z_pos)),
            z_neg: borrow(Some(z_neg)),
            t,
            t_max,
            z_out: std::ptr::null_mut(),
        };
        // SAFETY: obj is live; io and the tensors outlive the call.
        let res = call(&format!("`{}` attention guidance", self.id), |err| unsafe { f(self.obj, &mut io, err) });
        let out = if io.z_out.is_null() { None } else { Some(take(io.z_out, "attention output")) };
        res?;
        out.transpose()
    }

    /// Draws samples from `noise` with a denoiser; returns the samples and the evaluation count.
    pub fn sample(
        &mut self,
        noise: &Tensor,
        eps: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor, String>,
        alphas_cumprod: &Tensor,
        data: Option<&Tensor>,
        next_u64: &mut dyn FnMut() -> u64,
    ) -> Result<(Tensor, u64), String> {
        self.sample_with(noise, eps, None, alphas_cumprod, data, next_u64)
    }

    /// As [`Instance::sample`], with `both` answering a sampler that asks for the conditional
    /// and unconditional predictions together (`DenoiserCtx::eps_both`); without it such a
    /// request is an error saying the model takes no condition.
    pub fn sample_with<'a>(
        &mut self,
        noise: &Tensor,
        eps: &'a mut dyn FnMut(&Tensor, f64) -> Result<Tensor, String>,
        both: Option<BothFn<'a>>,
        alphas_cumprod: &Tensor,
        data: Option<&Tensor>,
        next_u64: &mut dyn FnMut() -> u64,
    ) -> Result<(Tensor, u64), String> {
        struct Calls<'a> {
            eps: &'a mut dyn FnMut(&Tensor, f64) -> Result<Tensor, String>,
            both: Option<BothFn<'a>>,
        }
        /// Hands the plugin an owned handle to `e`.
        fn give_out(e: &Tensor, out: *mut *mut c_void) {
            let mut owned = e.shallow_clone();
            // SAFETY: the out-pointer is valid during the call; the plugin takes ownership.
            unsafe { *out = owned.as_mut_ptr().cast() };
            std::mem::forget(owned);
        }
        unsafe extern "C" fn eps_tramp(
            ctx: *mut c_void,
            x: *mut c_void,
            t: f64,
            out: *mut *mut c_void,
            err: *const Sink,
        ) -> Status {
            // SAFETY: ctx is the Calls below; x is a borrowed handle valid during the call.
            let calls = unsafe { &mut *(ctx as *mut Calls<'_>) };
            let x = unsafe { Tensor::clone_from_ptr(x.cast()) };
            match (calls.eps)(&x, t) {
                Ok(e) => {
                    give_out(&e, out);
                    Status::Ok
                }
                Err(m) => {
                    err_to_sink(err, &m);
                    Status::Error
                }
            }
        }
        unsafe extern "C" fn both_tramp(
            ctx: *mut c_void,
            x: *mut c_void,
            t: f64,
            out_cond: *mut *mut c_void,
            out_uncond: *mut *mut c_void,
            err: *const Sink,
        ) -> Status {
            // SAFETY: ctx is the Calls below; x is a borrowed handle valid during the call.
            let calls = unsafe { &mut *(ctx as *mut Calls<'_>) };
            let x = unsafe { Tensor::clone_from_ptr(x.cast()) };
            let Some(both) = calls.both.as_mut() else {
                err_to_sink(err, "the conditional and unconditional predictions need a class-conditional model");
                return Status::Error;
            };
            match both(&x, t) {
                Ok((c, u)) => {
                    give_out(&c, out_cond);
                    give_out(&u, out_uncond);
                    Status::Ok
                }
                Err(m) => {
                    err_to_sink(err, &m);
                    Status::Error
                }
            }
        }
        let f = self.decl.sample.ok_or_else(|| format!("`{}` is not a sampler", self.id))?;
        let mut calls = Calls { eps, both };
        let den = abi::Denoiser {
            ctx: (&mut calls as *mut Calls<'_>).cast(),
            eps: eps_tramp,
            eps_both: both_tramp,
            alphas_cumprod: borrow(Some(alphas_cumprod)),
            data: borrow(data),
        };
        let mut r: &mut dyn FnMut() -> u64 = next_u64;
        let rng = abi::Rng { ctx: (&mut r as *mut &mut dyn FnMut() -> u64).cast(), next_u64: rng_trampoline };
        let mut io = abi::SampleIo { noise: borrow(Some(noise)), x_out: std::ptr::null_mut(), nfe: 0 };
        // SAFETY: obj is live; everything passed outlives the call.
        let res = call(&format!("`{}` sample", self.id), |err| unsafe { f(self.obj, &mut io, &den, &rng, err) });
        let out = take(io.x_out, "samples");
        res?;
        Ok((out?, io.nfe))
    }
}
