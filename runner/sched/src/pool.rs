//! The device pool: the slots jobs run in, each with its device and thread count.

use xlab_plan::file::DeviceKind;

fn kind_matches(kind: DeviceKind, device: &str) -> bool {
    match kind {
        DeviceKind::Any => true,
        DeviceKind::Cpu => device == "cpu",
        DeviceKind::Cuda => device.starts_with("cuda"),
    }
}

/// One place a job can run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    /// `cpu`, or `cuda:N` (the physical GPU index, exported to the worker as
    /// `CUDA_VISIBLE_DEVICES=N`, where it becomes `cuda:0`).
    pub device: String,
    pub threads: usize,
}

/// What one job takes from the pool (a stage's `resources:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Need {
    /// Slots of one device.
    pub slots: usize,
    pub kind: DeviceKind,
    /// The job's memory estimate on its device, in MiB (0: none given).
    pub memory_mib: u64,
    /// Whole GPUs (every slot of each); 0 for slots of one device.
    pub gpus: usize,
}

impl Need {
    /// One slot of any device, no memory estimate.
    pub fn one() -> Need {
        Need { slots: 1, kind: DeviceKind::Any, memory_mib: 0, gpus: 0 }
    }
}

/// What a running job holds: its slots, all on `device` (whole GPUs: `cuda:1,cuda:3`), and the
/// memory it reserved on each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub slots: Vec<usize>,
    pub device: String,
    pub memory_mib: u64,
}

/// Where a run's jobs take their slots: its own [`Pool`], or the pool of the run that owns the
/// store, shared by every run on it (see [`crate::hub`]).
pub trait Slots: Send {
    /// Takes what `need` asks for (see [`Pool::take`]) for a job of stage priority `priority`.
    fn take(&mut self, need: Need, avoid: Option<&str>, priority: i32) -> Option<Held>;
    /// Says that a ready job of `priority` that needs `need` found no room: a pool shared with
    /// other runs gives it the next room before their jobs of lower priority.
    fn wanting(&mut self, _need: Need, _priority: i32) {}
    fn give_back(&mut self, held: &Held);
    /// Free slots now.
    fn free(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn slot(&self, i: usize) -> Slot;
    fn never_fits(&self, need: Need) -> Option<String>;
    fn describe(&self) -> String;
}

impl Slots for Pool {
    fn take(&mut self, need: Need, avoid: Option<&str>, _priority: i32) -> Option<Held> {
        Pool::take(self, need, avoid)
    }
    fn give_back(&mut self, held: &Held) {
        Pool::give_back(self, held)
    }
    fn free(&self) -> usize {
        Pool::free(self)
    }
    fn len(&self) -> usize {
        Pool::len(self)
    }
    fn slot(&self, i: usize) -> Slot {
        Pool::slot(self, i).clone()
    }
    fn never_fits(&self, need: Need) -> Option<String> {
        Pool::never_fits(self, need)
    }
    fn describe(&self) -> String {
        Pool::describe(self)
    }
}

/// A fixed set of slots; jobs take free ones and give them back when they end. A device may
/// also have a memory capacity, which jobs with a memory estimate share.
#[derive(Debug, Clone)]
pub struct Pool {
    slots: Vec<Slot>,
    busy: Vec<bool>,
    /// Per device with a known capacity: (capacity, reserved), in MiB.
    memory: std::collections::HashMap<String, (u64, u64)>,
}

impl Pool {
    /// `n` CPU slots of `threads` threads each.
    pub fn cpu(n: usize, threads: usize) -> Self {
        let slots = vec![Slot { device: "cpu".into(), threads: threads.max(1) }; n.max(1)];
        Self::new(slots)
    }

    pub fn new(slots: Vec<Slot>) -> Self {
        let busy = vec![false; slots.len()];
        Self { slots, busy, memory: Default::default() }
    }

    /// Gives `device` a memory capacity that jobs with an estimate share.
    pub fn with_memory(mut self, device: &str, capacity_mib: u64) -> Self {
        self.memory.insert(device.to_string(), (capacity_mib, 0));
        self
    }

    /// Whether `device` has room for `mib` more (always, without a known capacity).
    fn memory_fits(&self, device: &str, mib: u64) -> bool {
        self.memory.get(device).is_none_or(|(cap, used)| mib == 0 || used + mib <= *cap)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn free(&self) -> usize {
        self.busy.iter().filter(|b| !**b).count()
    }

    /// Takes what `need` asks for on one device: free slots of its kind, and room for its memory
    /// estimate; a device other than `avoid` when one has room. `None` when none has room now.
    pub fn take(&mut self, need: Need, avoid: Option<&str>) -> Option<Held> {
        if need.gpus > 0 {
            return self.take_gpus(need, avoid);
        }
        let n = need.slots.max(1);
        let mut devices = self.devices(need.kind);
        // Devices other than `avoid` first; the order is otherwise the pool's.
        devices.sort_by_key(|d| Some(*d) == avoid);
        let device = devices
            .into_iter()
            .find(|d| self.free_on(d).count() >= n && self.memory_fits(d, need.memory_mib))?
            .to_string();
        let taken: Vec<usize> = self.free_on(&device).take(n).collect();
        Some(self.hold(taken, vec![device], need.memory_mib))
    }

    /// The distinct devices of `kind` in the pool, in pool order.
    fn devices(&self, kind: DeviceKind) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in self.slots.iter().filter(|s| kind_matches(kind, &s.device)) {
            if !out.contains(&s.device.as_str()) {
                out.push(&s.device);
            }
        }
        out
    }

    /// How many slots `device` has, busy or not.
    fn slots_of(&self, device: &str) -> usize {
        self.slots.iter().filter(|s| s.device == device).count()
    }

    /// The free slots of `device`.
    fn free_on<'a>(&'a self, device: &'a str) -> impl Iterator<Item = usize> + 'a {
        (0..self.slots.len()).filter(move |&i| !self.busy[i] && self.slots[i].device == device)
    }

    /// Whether `device` could ever hold `mib` (its capacity, unknown capacities always).
    fn memory_could_fit(&self, device: &str, mib: u64) -> bool {
        self.memory.get(device).is_none_or(|(cap, _)| mib <= *cap)
    }

    /// Marks `slots` busy and reserves `mib` on each of `devices`.
    fn hold(&mut self, slots: Vec<usize>, devices: Vec<String>, mib: u64) -> Held {
        for &i in &slots {
            self.busy[i] = true;
        }
        for d in &devices {
            if let Some((_, used)) = self.memory.get_mut(d) {
                *used += mib;
            }
        }
        Held { slots, device: devices.join(","), memory_mib: mib }
    }

    /// `need.gpus` whole GPUs: every slot of each free, and room for the memory estimate.
    fn take_gpus(&mut self, need: Need, avoid: Option<&str>) -> Option<Held> {
        let mut idle: Vec<String> = self
            .devices(DeviceKind::Cuda)
            .into_iter()
            .filter(|d| self.free_on(d).count() == self.slots_of(d) && self.memory_fits(d, need.memory_mib))
            .map(str::to_string)
            .collect();
        idle.sort_by_key(|d| Some(d.as_str()) == avoid);
        if idle.len() < need.gpus {
            return None;
        }
        idle.truncate(need.gpus);
        let slots: Vec<usize> = (0..self.slots.len()).filter(|&i| idle.contains(&self.slots[i].device)).collect();
        Some(self.hold(slots, idle, need.memory_mib))
    }

    /// Why the pool can never hold a job that needs `need`, or `None` if it can.
    pub fn never_fits(&self, need: Need) -> Option<String> {
        if need.gpus > 0 {
            let gpus = self.devices(DeviceKind::Cuda);
            return if gpus.len() < need.gpus {
                Some(format!("has {} GPU(s)", gpus.len()))
            } else if gpus.iter().filter(|d| self.memory_could_fit(d, need.memory_mib)).count() < need.gpus {
                Some(format!(
                    "has fewer than {} GPUs with {:.1} GB of memory",
                    need.gpus,
                    need.memory_mib as f64 / 1024.0
                ))
            } else {
                None
            };
        }
        let devices = self.devices(need.kind);
        if devices.is_empty() {
            return Some("has none".into());
        }
        let most = devices.iter().map(|d| self.slots_of(d)).max().unwrap_or(0);
        if most < need.slots {
            return Some(format!("has at most {most} per device"));
        }
        if !devices.iter().any(|d| self.slots_of(d) >= need.slots && self.memory_could_fit(d, need.memory_mib)) {
            let caps: Vec<String> = devices
                .iter()
                .filter_map(|d| self.memory.get(*d).map(|(cap, _)| format!("{d} {:.1} GB", *cap as f64 / 1024.0)))
                .collect();
            return Some(format!(
                "has no device with {:.1} GB of memory ({})",
                need.memory_mib as f64 / 1024.0,
                caps.join(", ")
            ));
        }
        None
    }

    /// Whether `need` could be taken now.
    pub fn fits_now(&self, need: Need) -> bool {
        self.clone().take(need, None).is_some()
    }

    /// The slots, in order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Gives back what a job held.
    pub fn give_back(&mut self, held: &Held) {
        for &i in &held.slots {
            assert!(self.busy[i], "slot {i} given back twice");
            self.busy[i] = false;
        }
        for d in held.device.split(',') {
            if let Some((_, used)) = self.memory.get_mut(d) {
                *used = used.saturating_sub(held.memory_mib);
            }
        }
    }

    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// `2 × cpu, 4 × cuda:0`: the devices and how many jobs each takes at once.
    pub fn describe(&self) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for s in &self.slots {
            match counts.iter_mut().find(|(d, _)| *d == s.device) {
                Some((_, n)) => *n += 1,
                None => counts.push((&s.device, 1)),
            }
        }
        counts.iter().map(|(d, n)| format!("{n} × {d}")).collect::<Vec<_>>().join(", ")
    }
}

/// Default CPU slots for a machine: one single-threaded slot per core.
pub fn default_cpu_slots() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A GPU of this machine, as NVML or `nvidia-smi` reports it (no libtorch in the coordinator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The physical index (what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    pub name: String,
    pub memory_mib: u64,
}

/// The GPUs NVML reports (through `nvml-wrapper`, which loads the driver's library at run time),
/// else those `nvidia-smi` lists, restricted to the coordinator's own `CUDA_VISIBLE_DEVICES` when
/// that names indices. Empty without a driver.
pub fn detect_gpus() -> Vec<Gpu> {
    let gpus = nvml_gpus().unwrap_or_else(|why| {
        tracing::debug!("NVML: {why}; asking nvidia-smi");
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"])
            .output();
        match out {
            Ok(o) if o.status.success() => parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)),
            _ => Vec::new(),
        }
    });
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => restrict_to_visible(gpus, &v),
        Err(_) => gpus,
    }
}

/// The GPUs NVML (the driver's management library, loaded at run time) reports, or why not.
fn nvml_gpus() -> Result<Vec<Gpu>, String> {
    use nvml_wrapper::Nvml;
    // Drivers install `libnvidia-ml.so.1`; the unversioned name comes with development files.
    let nvml = Nvml::builder()
        .lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1"))
        .init()
        .or_else(|_| Nvml::init())
        .map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let d = nvml.device_by_index(i).map_err(|e| e.to_string())?;
        let memory = d.memory_info().map_err(|e| e.to_string())?;
        gpus.push(Gpu {
            index: i,
            name: d.name().map_err(|e| e.to_string())?,
            memory_mib: memory.total / (1024 * 1024),
        });
    }
    Ok(gpus)
}

/// Parses `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let index = f.next()?.parse().ok()?;
            let name = f.next()?.to_string();
            let memory_mib = f.next()?.parse().ok()?;
            Some(Gpu { index, name, memory_mib })
        })
        .collect()
}

/// Keeps the GPUs a `CUDA_VISIBLE_DEVICES` value names by index; a value that is not a list of
/// indices (UUIDs, MIG names) leaves the list as it is.
fn restrict_to_visible(gpus: Vec<Gpu>, visible: &str) -> Vec<Gpu> {
    let visible = visible.trim();
    if visible.is_empty() {
        return Vec::new();
    }
    let Ok(indices) = visible.split(',').map(|s| s.trim().parse::<u32>()).collect::<Result<Vec<_>, _>>() else {
        return gpus;
    };
    gpus.into_iter().filter(|g| indices.contains(&g.index)).collect()
}

/// Where jobs may run, as the user asks for it (`--devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// Every GPU found, or CPU slots when there is none.
    Auto,
    /// A list of `cpu` and `cuda` (every GPU) / `cuda:N` entries.
    List(Vec<DeviceEntry>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEntry {
    Cpu,
    AllGpus,
    Gpu(u32),
}

impl std::str::FromStr for Devices {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(Devices::Auto);
        }
        let mut list = Vec::new();
        for part in s.split(',').map(str::trim) {
            let entry = match part {
                "cpu" => DeviceEntry::Cpu,
                "cuda" | "gpu" => DeviceEntry::AllGpus,
                _ => match part.strip_prefix("cuda:").map(str::parse::<u32>) {
                    Some(Ok(n)) => DeviceEntry::Gpu(n),
                    _ => {
                        return Err(format!(
                            "unknown device `{part}`; write `auto`, `cpu`, `cuda` (every GPU) or `cuda:N`, \
                             comma-separated (for example `cuda:0,cuda:2`)"
                        ))
                    }
                },
            };
            if !list.contains(&entry) {
                list.push(entry);
            }
        }
        Ok(Devices::List(list))
    }
}

/// How many jobs go where.
#[derive(Debug, Clone)]
pub struct PoolRequest {
    pub devices: Devices,
    /// CPU slots (`--jobs`); `None`: one per core divided by `threads`.
    pub cpu_jobs: Option<usize>,
    /// Jobs sharing one GPU (`--jobs-per-device`).
    pub jobs_per_gpu: usize,
    /// Threads per job.
    pub threads: usize,
}

/// Builds the pool the request names from the GPUs found. Asking for a GPU this machine does not
/// have is an error that lists the ones it has.
pub fn build_pool(req: &PoolRequest, gpus: &[Gpu]) -> Result<Pool, String> {
    let threads = req.threads.max(1);
    let cpu_slots = req.cpu_jobs.unwrap_or_else(|| (default_cpu_slots() / threads).max(1)).max(1);
    let found = || {
        if gpus.is_empty() {
            "this machine shows none (`nvidia-smi` finds no GPU)".to_string()
        } else {
            let l: Vec<String> = gpus.iter().map(|g| format!("cuda:{} ({})", g.index, g.name)).collect();
            format!("this machine has {}", l.join(", "))
        }
    };
    let entries = match &req.devices {
        Devices::Auto if gpus.is_empty() => vec![DeviceEntry::Cpu],
        Devices::Auto => vec![DeviceEntry::AllGpus],
        Devices::List(l) => l.clone(),
    };
    let mut slots = Vec::new();
    let gpu_slots = |index: u32, slots: &mut Vec<Slot>| {
        let device = format!("cuda:{index}");
        if !slots.iter().any(|s: &Slot| s.device == device) {
            slots.extend((0..req.jobs_per_gpu.max(1)).map(|_| Slot { device: device.clone(), threads }));
        }
    };
    for e in entries {
        match e {
            DeviceEntry::Cpu => slots.extend((0..cpu_slots).map(|_| Slot { device: "cpu".into(), threads })),
            DeviceEntry::AllGpus if gpus.is_empty() => {
                return Err(format!("`--devices cuda` asks for every GPU, but {}", found()));
            }
            DeviceEntry::AllGpus => gpus.iter().for_each(|g| gpu_slots(g.index, &mut slots)),
            DeviceEntry::Gpu(n) if !gpus.iter().any(|g| g.index == n) => {
                return Err(format!("`--devices` asks for cuda:{n}, but {}", found()));
            }
            DeviceEntry::Gpu(n) => gpu_slots(n, &mut slots),
        }
    }
    let mut pool = Pool::new(slots);
    for g in gpus {
        pool = pool.with_memory(&format!("cuda:{}", g.index), g.memory_mib);
    }
    if let Some(mib) = host_memory_mib() {
        pool = pool.with_memory("cpu", mib);
    }
    Ok(pool)
}

/// The machine's memory (`MemTotal` of /proc/meminfo), in MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(slots: usize, kind: DeviceKind) -> Need {
        Need { slots, kind, memory_mib: 0, gpus: 0 }
    }

    #[test]
    fn slots_are_taken_and_given_back() {
        let mut p = Pool::cpu(2, 1);
        let a = p.take(Need::one(), None).unwrap();
        let b = p.take(Need::one(), None).unwrap();
        assert_ne!(a.slots, b.slots);
        assert_eq!(p.take(Need::one(), None), None);
        p.give_back(&a);
        assert_eq!(p.free(), 1);
        assert_eq!(p.take(need(1, DeviceKind::Cpu), None), Some(a));
    }

    #[test]
    fn a_retry_after_running_out_of_memory_prefers_another_device() {
        let slot = |d: &str| Slot { device: d.into(), threads: 1 };
        let mut p = Pool::new(vec![slot("cuda:0"), slot("cuda:1")]);
        assert_eq!(p.take(Need::one(), Some("cuda:0")).unwrap().slots, vec![1]);
        let again = p.take(need(1, DeviceKind::Cuda), Some("cuda:0")).unwrap();
        assert_eq!(again.slots, vec![0], "the avoided device when nothing else is free");
        assert_eq!(p.take(Need::one(), None), None);
    }

    #[test]
    fn a_job_takes_several_slots_of_one_device_of_its_kind() {
        let slot = |d: &str| Slot { device: d.into(), threads: 2 };
        let mut p = Pool::new(vec![slot("cpu"), slot("cuda:0"), slot("cuda:0"), slot("cuda:1"), slot("cuda:1")]);
        assert_eq!(p.never_fits(need(2, DeviceKind::Any)), None);
        assert_eq!(p.never_fits(need(2, DeviceKind::Cpu)).as_deref(), Some("has at most 1 per device"));
        assert_eq!(p.never_fits(need(3, DeviceKind::Any)).as_deref(), Some("has at most 2 per device"));
        assert_eq!(p.take(need(1, DeviceKind::Cuda), None).unwrap().slots, vec![1]);
        // cuda:0 has one slot left, so two slots come from cuda:1.
        assert_eq!(p.take(need(2, DeviceKind::Cuda), None).unwrap().slots, vec![3, 4]);
        assert_eq!(p.take(need(2, DeviceKind::Any), None), None);
        assert_eq!(p.take(need(1, DeviceKind::Cpu), None).unwrap().slots, vec![0]);
        assert_eq!(p.take(need(1, DeviceKind::Cpu), None), None, "a cpu job never lands on a GPU");
        assert_eq!(p.take(Need::one(), None).unwrap().slots, vec![2]);
    }

    #[test]
    fn memory_estimates_pack_jobs_onto_a_device() {
        let slot = |d: &str| Slot { device: d.into(), threads: 1 };
        // Two 80 GB GPUs with four slots each.
        let mut p = Pool::new((0..8).map(|i| slot(if i < 4 { "cuda:0" } else { "cuda:1" })).collect())
            .with_memory("cuda:0", 81920)
            .with_memory("cuda:1", 81920);
        let gb = |g: u64| Need { slots: 1, kind: DeviceKind::Cuda, memory_mib: g * 1024, gpus: 0 };
        let a = p.take(gb(50), None).unwrap();
        let b = p.take(gb(50), None).unwrap();
        assert_eq!((a.device.as_str(), b.device.as_str()), ("cuda:0", "cuda:1"), "50 + 50 GB do not fit on one");
        assert_eq!(p.take(gb(40), None), None, "30 GB are left on each");
        let c = p.take(gb(30), None).unwrap();
        assert_eq!(c.device, "cuda:0");
        // Jobs without an estimate still take the free slots.
        assert!(p.take(Need::one(), None).is_some());
        p.give_back(&a);
        assert_eq!(p.take(gb(40), None).unwrap().device, "cuda:0");
        assert_eq!(
            p.never_fits(gb(90)).as_deref(),
            Some("has no device with 90.0 GB of memory (cuda:0 80.0 GB, cuda:1 80.0 GB)")
        );
    }

    #[test]
    fn a_job_takes_whole_gpus() {
        let slot = |d: &str| Slot { device: d.into(), threads: 1 };
        let mut p = Pool::new(vec![
            slot("cpu"),
            slot("cuda:0"),
            slot("cuda:0"),
            slot("cuda:1"),
            slot("cuda:1"),
            slot("cuda:2"),
        ]);
        let two = Need { gpus: 2, ..Need::one() };
        let one_slot = p.take(need(1, DeviceKind::Cuda), None).unwrap();
        assert_eq!(one_slot.device, "cuda:0");
        // cuda:0 is partly busy: the two whole GPUs are cuda:1 and cuda:2, with all their slots.
        let held = p.take(two, None).unwrap();
        assert_eq!((held.device.as_str(), held.slots.clone()), ("cuda:1,cuda:2", vec![3, 4, 5]));
        let (lease, visible) = crate::spawn::lease_for(&Slot { device: held.device.clone(), threads: 1 });
        assert_eq!((lease.device.as_str(), visible.as_str()), ("cuda:0", "1,2"));
        assert_eq!(p.take(two, None), None);
        p.give_back(&held);
        p.give_back(&one_slot);
        assert_eq!(p.take(Need { gpus: 3, ..Need::one() }, None).unwrap().slots, vec![1, 2, 3, 4, 5]);
        assert_eq!(p.never_fits(Need { gpus: 4, ..Need::one() }).as_deref(), Some("has 3 GPU(s)"));
    }

    fn h200s(n: u32) -> Vec<Gpu> {
        (0..n).map(|index| Gpu { index, name: "NVIDIA H200".into(), memory_mib: 143771 }).collect()
    }

    fn devices(req: &str, jobs_per_gpu: usize, gpus: &[Gpu]) -> Result<Vec<String>, String> {
        let req = PoolRequest { devices: req.parse()?, cpu_jobs: Some(2), jobs_per_gpu, threads: 1 };
        let pool = build_pool(&req, gpus)?;
        Ok((0..pool.len()).map(|i| pool.slot(i).device.clone()).collect())
    }

    #[test]
    fn nvidia_smi_lines_parse() {
        let text = "0, NVIDIA H200, 143771\n1, NVIDIA H200, 143771\n\ngarbage\n";
        assert_eq!(parse_nvidia_smi(text), h200s(2));
    }

    #[test]
    fn visible_devices_restrict_by_index() {
        assert_eq!(restrict_to_visible(h200s(4), "1, 3").iter().map(|g| g.index).collect::<Vec<_>>(), [1, 3]);
        assert!(restrict_to_visible(h200s(4), "").is_empty());
        assert_eq!(restrict_to_visible(h200s(2), "GPU-5f0e").len(), 2, "UUIDs are left to the driver");
    }

    #[test]
    fn auto_uses_every_gpu_or_the_cpu() {
        assert_eq!(devices("auto", 1, &h200s(2)).unwrap(), ["cuda:0", "cuda:1"]);
        assert_eq!(devices("auto", 1, &[]).unwrap(), ["cpu", "cpu"]);
    }

    #[test]
    fn explicit_devices_and_jobs_per_gpu() {
        assert_eq!(devices("cuda:2,cuda:0", 2, &h200s(4)).unwrap(), ["cuda:2", "cuda:2", "cuda:0", "cuda:0"]);
        assert_eq!(devices("cuda,cuda:1", 1, &h200s(2)).unwrap(), ["cuda:0", "cuda:1"], "no GPU twice");
        assert_eq!(devices("cpu,cuda:1", 1, &h200s(2)).unwrap(), ["cpu", "cpu", "cuda:1"]);
    }

    #[test]
    fn missing_gpus_and_bad_names_are_clear_errors() {
        let e = devices("cuda:3", 1, &h200s(2)).unwrap_err();
        assert!(e.contains("cuda:3") && e.contains("cuda:0 (NVIDIA H200), cuda:1 (NVIDIA H200)"), "{e}");
        let e = devices("cuda", 1, &[]).unwrap_err();
        assert!(e.contains("finds no GPU"), "{e}");
        let e = devices("gpu0", 1, &[]).unwrap_err();
        assert!(e.contains("unknown device `gpu0`") && e.contains("cuda:N"), "{e}");
    }
}
