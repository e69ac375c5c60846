//! The Slurm executor: the coordinator stays where it is (a login node) and keeps the store;
//! each ready job is submitted with `sbatch` (one job array per stage when several are ready at
//! once) and runs `xlab-worker` on the node Slurm allocates. Nodes cannot reach the store's
//! database, so a worker writes its event stream to `runs/<job>/events-<attempt>.jsonl` beside its
//! artifacts (the store's folder must be on a filesystem the nodes share, as home and scratch
//! folders are). A watcher thread tails those files and polls `squeue`; it turns lines into the
//! same messages a local worker's pipe gives, and a job that leaves the queue into an exit with
//! Slurm's final state. Reading a file again from its start (after a coordinator restart) writes
//! the same points again, never new ones: the store keys a point by job, metric and step.

use crate::spawn::{Exit, Msg};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use xlab_proto::{Event, FailureCause};

/// How the run reaches Slurm.
#[derive(Debug, Clone)]
pub struct SlurmExec {
    cfg: xlab_plan::file::Slurm,
    /// `xlab-worker`, as an absolute path (nodes run it from the shared filesystem).
    worker: PathBuf,
    /// `<store>/slurm`: batch scripts, task lists and Slurm's own output files.
    dir: PathBuf,
    /// The folder jobs start in (the coordinator's).
    cwd: PathBuf,
    /// `--cpus-per-task` when the file does not set `cpus_per_job`.
    threads: u32,
    /// What the cluster lets this user queue.
    limits: Limits,
}

/// What a cluster lets one user queue, as far as xlab can see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// `MaxArraySize` (`scontrol show config`): an array's task indices stay below it.
    pub max_array_size: Option<u32>,
    /// At most this many of the user's jobs in the queue at once, pending or running, each
    /// array task counted; and where the number comes from (`MaxSubmitJobs` of the user's
    /// association or QOS, or the file's `max_submit`).
    pub max_submit: Option<(u32, String)>,
    /// `MaxJobCount` (`scontrol show config`): the controller's own ceiling, for everyone.
    pub max_job_count: Option<u32>,
    /// Why the account's limits could not be read, if they could not (no accounting).
    pub accounting: Option<String>,
}

impl Limits {
    /// One line about them, for the run's log and `xlab doctor`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.max_array_size {
            parts.push(format!("MaxArraySize {n}"));
        }
        if let Some(n) = self.max_job_count {
            parts.push(format!("MaxJobCount {n}"));
        }
        match (&self.max_submit, &self.accounting) {
            (Some((n, from)), _) => parts.push(format!("at most {n} queued job(s) per user ({from})")),
            (None, Some(why)) => parts.push(format!("MaxSubmitJobs not visible ({why})")),
            (None, None) => parts.push("no MaxSubmitJobs".into()),
        }
        parts.join(", ")
    }

    /// The most tasks one array may have: `MaxArraySize`, and no more than may be queued.
    pub fn array_cap(&self) -> usize {
        let cap = self.max_array_size.unwrap_or(u32::MAX).min(self.max_submit.as_ref().map_or(u32::MAX, |m| m.0));
        cap.max(1) as usize
    }
}

/// `key = value` lines (`scontrol show config`): the number under `key`, if it is one.
fn config_number(text: &str, key: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

/// Runs a command that may hang (`sacctmgr` waits for a database daemon that is not there):
/// its standard output if it answers in time and succeeds.
fn answer_within(mut c: Command, limit: Duration) -> Result<String, String> {
    let name = c.get_program().to_string_lossy().into_owned();
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{name}`: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{name}` did not answer within {} s", limit.as_secs()));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("`{name}`: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed").trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The smallest positive number in `|`-separated fields (`sacctmgr -P`), with its line.
fn smallest_limit<'a>(lines: impl Iterator<Item = &'a str>, field: usize) -> Option<(u32, &'a str)> {
    lines
        .filter_map(|l| {
            let n: u32 = l.split('|').nth(field)?.trim().parse().ok()?;
            (n > 0).then_some((n, l))
        })
        .min_by_key(|(n, _)| *n)
}

/// The cluster's limits on what this user may queue: `scontrol show config` for the
/// controller's, `sacctmgr` for the association's and QOS's `MaxSubmitJobs` where accounting
/// runs; `max_submit` (the file's) caps them further.
pub fn limits(max_submit: Option<u32>, extra_args: &[String]) -> Limits {
    let mut c = Command::new("scontrol");
    c.args(["show", "config"]);
    let config = answer_within(c, Duration::from_secs(15)).unwrap_or_default();
    let mut out = Limits {
        max_array_size: config_number(&config, "MaxArraySize"),
        max_job_count: config_number(&config, "MaxJobCount"),
        ..Limits::default()
    };
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        // Root's shells, and services, may run without USER.
        let uid = unsafe { libc::getuid() };
        if uid == 0 {
            "root".into()
        } else {
            uid.to_string()
        }
    });
    let mut found: Vec<(u32, String)> = Vec::new();
    let mut c = Command::new("sacctmgr");
    c.args(["-nP", "show", "assoc", "where", &format!("user={user}"), "format=MaxSubmit,DefaultQOS,QOS"]);
    match answer_within(c, Duration::from_secs(10)) {
        Ok(text) => {
            if let Some((n, _)) = smallest_limit(text.lines(), 0) {
                found.push((n, "MaxSubmitJobs of your association".into()));
            }
            // The QOS the jobs run under: `--qos=` among the file's `extra_args`, else the
            // association's default.
            let asked = extra_args.iter().find_map(|a| a.strip_prefix("--qos=").map(str::to_string));
            let default = text.lines().find_map(|l| l.split('|').nth(1).map(str::trim).filter(|q| !q.is_empty()));
            if let Some(qos) = asked.or(default.map(str::to_string)) {
                let mut c = Command::new("sacctmgr");
                c.args(["-nP", "show", "qos", "where", &format!("name={qos}"), "format=MaxSubmitPU"]);
                if let Some((n, _)) = answer_within(c, Duration::from_secs(10))
                    .ok()
                    .and_then(|t| smallest_limit(t.lines(), 0).map(|(n, _)| (n, ())))
                {
                    found.push((n, format!("MaxSubmitJobsPerUser of QOS `{qos}`")));
                }
            }
        }
        Err(why) => out.accounting = Some(why),
    }
    if let Some(n) = max_submit {
        found.push((n, "the file's `max_submit`".into()));
    }
    out.max_submit = found.into_iter().min_by_key(|(n, _)| *n);
    out
}

/// One job to submit.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request: PathBuf,
    pub events: PathBuf,
    pub log: PathBuf,
    pub stage: String,
    pub gpus: u32,
    pub deterministic: bool,
}

/// A job's line in `squeue`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueEntry {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, `TIMEOUT`, `PREEMPTED`, `NODE_FAIL`, ...
    pub state: String,
    /// Why it waits, while it does (`Resources`, `Priority`, `JobArrayTaskLimit`).
    pub reason: String,
    /// The node it runs on, once it does.
    pub node: String,
}

impl QueueEntry {
    /// Whether Slurm is done with the job (it stays listed a while, `MinJobAge`).
    pub fn ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESV_DEL_HOLD"
        )
    }
}

/// Runs a Slurm command; its standard output, or an error naming it and what it said.
fn slurm_command(mut c: Command) -> Result<String, String> {
    let name = c.get_program().to_string_lossy().into_owned();
    let out = c.output().map_err(|e| {
        format!("cannot run `{name}`: {e}\n  hint: the Slurm executor needs Slurm's commands (sbatch, squeue, scancel) on PATH")
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("`{name}` failed ({}): {}", out.status, err.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `sbatch --parsable …`: the id of the job it submitted.
fn sbatch(c: Command) -> Result<String, String> {
    let out = slurm_command(c)?;
    // `--parsable`: `jobid` or `jobid;cluster`.
    let id = out.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("sbatch answered `{}`, not a job id", out.trim()));
    }
    Ok(id)
}

/// `--flag=value` for each flag that has a value.
fn set_flags<const N: usize>(c: &mut Command, flags: [(&str, &Option<String>); N]) {
    for (flag, v) in flags {
        if let Some(v) = v {
            c.arg(format!("--{flag}={v}"));
        }
    }
}

/// `'…'` for bash, whatever the text holds.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

impl SlurmExec {
    /// Checks that Slurm answers and makes the paths absolute. `threads`: `--threads`.
    pub fn new(cfg: xlab_plan::file::Slurm, worker: &Path, store: &Path, threads: usize) -> Result<Self, String> {
        let worker = absolute(worker).map_err(|e| format!("cannot resolve {}: {e}", worker.display()))?;
        if !worker.is_file() {
            return Err(format!(
                "the worker {} does not exist\n  hint: build it with `make build`, or point XLAB_WORKER at it",
                worker.display()
            ));
        }
        let mut probe = Command::new("squeue");
        probe.arg("--version");
        slurm_command(probe)?;
        let dir = absolute(&store.join("slurm")).map_err(|e| format!("cannot resolve the store's folder: {e}"))?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current folder: {e}"))?;
        let limits = limits(cfg.max_submit, &cfg.extra_args);
        Ok(SlurmExec { cfg, worker, dir, cwd, threads: threads.max(1) as u32, limits })
    }

    /// What the cluster lets this user queue.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many more jobs may go into the queue now (each array task counted), when the
    /// user's jobs are capped: the cap less those of the user's jobs Slurm has not finished.
    pub fn room(&self) -> Option<Result<usize, String>> {
        let (cap, _) = self.limits.max_submit.as_ref()?;
        Some(queue().map(|q| (*cap as usize).saturating_sub(q.values().filter(|e| !e.ended()).count())))
    }

    /// Jobs per allocation (`pack`).
    pub fn pack(&self) -> usize {
        self.cfg.pack.unwrap_or(1).max(1) as usize
    }

    /// How many of a pack's jobs run side by side (`pack_at_once`, default all).
    fn at_once(&self) -> usize {
        self.cfg.pack_at_once.map_or(self.pack(), |a| (a as usize).clamp(1, self.pack()))
    }

    /// The thread count of each job (`--cpus-per-task`).
    pub fn cpus(&self) -> u32 {
        self.cfg.cpus_per_job.unwrap_or(self.threads)
    }

    /// The GPUs a job asks for: its stage's `resources: {gpus: N}`, else none for a CPU-only
    /// stage, else the executor's `gpus_per_job`.
    pub fn gpus_for(&self, job: &xlab_plan::Job) -> u32 {
        if job.exec.gpus > 0 {
            job.exec.gpus
        } else if job.exec.device == xlab_plan::file::DeviceKind::Cpu {
            0
        } else {
            self.cfg.gpus_per_job.unwrap_or(0)
        }
    }

    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.poll_s.unwrap_or(2.0))
    }

    /// One line for the run's log: where jobs go.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("{} CPU(s)", self.cpus())];
        if let Some(g) = self.cfg.gpus_per_job.filter(|&g| g > 0) {
            parts.push(format!("{g} GPU(s)"));
        }
        if let Some(p) = &self.cfg.partition {
            parts.push(format!("partition {p}"));
        }
        if let Some(t) = &self.cfg.time {
            parts.push(format!("time {t}"));
        }
        let packs = match (self.pack(), self.at_once()) {
            (1, _) => String::new(),
            (n, a) if a == n => format!("; {n} jobs per allocation, side by side"),
            (n, 1) => format!("; {n} jobs per allocation, one after another"),
            (n, a) => format!("; {n} jobs per allocation, {a} at once"),
        };
        format!("Slurm ({} a job{packs}; {})", parts.join(", "), self.limits.describe())
    }

    /// Slurm's output file for a job id (`--output`): the `*** JOB … CANCELLED …` line is there.
    pub fn output_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.out"))
    }

    /// Submits jobs of one stage that ask for the same resources: one `sbatch`, a job array
    /// when there are several allocations (`pack` jobs each), split into arrays `MaxArraySize`
    /// allows. Returns each job's Slurm id (`1234` or `1234_5`; the jobs of a pack share
    /// theirs), in order; on an error, those submitted before it.
    pub fn submit(&self, experiment: &str, jobs: &[Submission]) -> Result<Vec<String>, (Vec<String>, String)> {
        let mut ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(self.limits.array_cap() * self.pack()) {
            match self.submit_array(experiment, chunk) {
                Ok(more) => ids.extend(more),
                Err(e) => return Err((ids, e)),
            }
        }
        Ok(ids)
    }

    fn submit_array(&self, experiment: &str, jobs: &[Submission]) -> Result<Vec<String>, String> {
        static SUBMITTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let first = jobs.first().expect("something to submit");
        let stamp = format!(
            "{}-{}-{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis(),
            std::process::id(),
            SUBMITTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let list = self.dir.join(format!("{stamp}.tasks"));
        let script = self.dir.join(format!("{stamp}.sh"));
        let mut lines = String::new();
        for j in jobs {
            for p in [&j.request, &j.events, &j.log] {
                let p = p.to_string_lossy();
                if p.contains(['\t', '\n']) {
                    return Err(format!("the path {p} holds a tab or a newline, which a Slurm task list cannot carry"));
                }
            }
            lines += &format!("{}\t{}\t{}\n", j.request.display(), j.events.display(), j.log.display());
        }
        let threads = self.cpus();
        // Jobs per array task, and of those how many side by side: the allocation's size.
        let pack = self.pack().min(jobs.len());
        let tasks = jobs.len().div_ceil(pack);
        let lanes = self.at_once().min(pack);
        let worker = quote(&self.worker.to_string_lossy());
        let list_q = quote(&list.to_string_lossy());
        let mut body = format!(
            "#!/bin/bash\n# xlab: {n} job(s) of stage `{stage}` of experiment `{experiment}`, {pack} per allocation; \
             lines {pack}N+1 to {pack}N+{pack} of the task list are array task N.\n\
             export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}\n",
            n = jobs.len(),
            stage = first.stage,
        );
        if first.gpus == 0 {
            body += "export CUDA_VISIBLE_DEVICES=\n";
        }
        if first.deterministic {
            body += "export CUBLAS_WORKSPACE_CONFIG=:4096:8\n";
        }
        // `exec`: the worker (or the pack's supervisor, which passes it on) gets Slurm's
        // SIGTERM (scancel, time limit, preemption) itself and stops at a checkpoint.
        body += &if self.pack() == 1 {
            format!(
                "IFS=$'\\t' read -r request events log < <(sed -n \"$(( ${{SLURM_ARRAY_TASK_ID:-0}} + 1 ))p\" {list_q})\n\
                 exec {worker} run --job \"$request\" > \"$events\" 2>> \"$log\"\n"
            )
        } else {
            format!(
                "exec {worker} pack --tasks {list_q} --first $(( ${{SLURM_ARRAY_TASK_ID:-0}} * {pack} )) --count {pack} \
                 --at-once {lanes} --gpus-per-job {gpus}\n",
                gpus = first.gpus
            )
        };
        let write =
            |p: &Path, text: &str| std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()));
        write(&list, &lines)?;
        write(&script, &body)?;
        let mut c = Command::new("sbatch");
        c.arg("--parsable")
            .arg(format!("--job-name=xlab-{experiment}"))
            .arg(format!("--chdir={}", self.cwd.display()))
            // A preempted or failed job is resubmitted by xlab's retry policy, never requeued by
            // Slurm (a requeued job would write its attempt's event file again from the start).
            .arg("--no-requeue")
            .arg(format!("--cpus-per-task={}", threads as usize * lanes));
        if first.gpus > 0 {
            c.arg(format!("--gpus={}", first.gpus as usize * lanes));
        }
        // Each lane of a pack runs its jobs in turn: the allocation's time is theirs together.
        let time = self.cfg.time.as_ref().map(|t| scaled_time(t, pack.div_ceil(lanes)));
        let mem = self.cfg.mem.as_ref().map(|m| scaled_mem(m, lanes));
        set_flags(
            &mut c,
            [("partition", &self.cfg.partition), ("account", &self.cfg.account), ("time", &time), ("mem", &mem)],
        );
        if tasks > 1 {
            let cap = self.cfg.array_parallelism.map(|p| format!("%{p}")).unwrap_or_default();
            c.arg(format!("--array=0-{}{cap}", tasks - 1));
            c.arg(format!("--output={}", self.dir.join("%A_%a.out").display()));
        } else {
            c.arg(format!("--output={}", self.dir.join("%j.out").display()));
        }
        c.args(&self.cfg.extra_args).arg(&script);
        let id = sbatch(c)?;
        Ok((0..jobs.len()).map(|k| if tasks > 1 { format!("{id}_{}", k / pack) } else { id.clone() }).collect())
    }

    /// Stops the job whose worker writes `events`, in Slurm job `id`. Alone in its allocation,
    /// by `scancel ID` (Slurm sends the worker SIGTERM, then SIGKILL after its `KillWait`); in a
    /// pack, where `scancel` would end the other jobs too, by asking the pack's supervisor to
    /// kill its worker.
    pub fn stop_job(&self, id: &str, events: &Path) {
        if self.pack() > 1 {
            let ask = xlab_proto::pack::kill_request(events);
            if let Err(e) = std::fs::write(&ask, b"") {
                tracing::error!("cannot ask for the worker in Slurm job {id} to be killed ({}): {e}", ask.display());
            }
            return;
        }
        let mut c = Command::new("scancel");
        c.arg(id);
        if let Err(e) = slurm_command(c) {
            tracing::warn!("cannot cancel Slurm job {id}: {e}");
        }
    }
}

/// Slurm's `--time` (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) times `k`; as given when
/// it is not one of those (`UNLIMITED`) or `k` is 1.
fn scaled_time(t: &str, k: usize) -> String {
    let parse = || -> Option<u64> {
        let (days, rest) = match t.split_once('-') {
            Some((d, r)) => (d.trim().parse::<u64>().ok()?, Some(r)),
            None => (0, None),
        };
        let nums = |s: &str| s.split(':').map(|p| p.trim().parse::<u64>().ok()).collect::<Option<Vec<u64>>>();
        let secs = match rest {
            // `D-H`, `D-H:M`, `D-H:M:S`
            Some(r) => match nums(r)?[..] {
                [h] => h * 3600,
                [h, m] => h * 3600 + m * 60,
                [h, m, s] => h * 3600 + m * 60 + s,
                _ => return None,
            },
            // `M`, `M:S`, `H:M:S`
            None => match nums(t)?[..] {
                [m] => m * 60,
                [m, s] => m * 60 + s,
                [h, m, s] => h * 3600 + m * 60 + s,
                _ => return None,
            },
        };
        Some(days * 86400 + secs)
    };
    match parse() {
        Some(secs) if k > 1 => {
            let s = secs * k as u64;
            format!("{}-{:02}:{:02}:{:02}", s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60)
        }
        _ => t.to_string(),
    }
}

/// Slurm's `--mem` (`16G`, `500M`, `2048`) times `k`; as given when it is not a number.
fn scaled_mem(m: &str, k: usize) -> String {
    let digits = m.trim().chars().take_while(char::is_ascii_digit).count();
    match m.trim()[..digits].parse::<u64>() {
        Ok(n) if k > 1 => format!("{}{}", n * k as u64, &m.trim()[digits..]),
        _ => m.to_string(),
    }
}

/// A coordinator submitted as a Slurm job (`xlab run --detach`), as `<store>/coordinator.json`
/// records it for `xlab attach` and `xlab status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Coordinator {
    pub slurm_job: String,
    pub experiment: String,
    /// Its output file: the log `xlab run` would have written to the terminal.
    pub output: PathBuf,
    pub submitted_unix: u64,
    /// The command it runs.
    pub command: Vec<String>,
}

impl Coordinator {
    pub fn path(store: &Path) -> PathBuf {
        store.join("coordinator.json")
    }

    /// The store's detached coordinator, if one was submitted.
    pub fn read(store: &Path) -> Option<Coordinator> {
        serde_json::from_slice(&std::fs::read(Self::path(store)).ok()?).ok()
    }

    /// Submits `argv` (an `xlab` command line, run in the current folder) as a one-CPU batch job
    /// of `cfg`'s partition and account, serving the store to other machines, and records it.
    pub fn submit(
        cfg: &xlab_plan::file::Slurm,
        store: &Path,
        experiment: &str,
        argv: &[String],
    ) -> Result<Coordinator, String> {
        let dir = absolute(&store.join("slurm")).map_err(|e| format!("cannot resolve the store's folder: {e}"))?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current folder: {e}"))?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let script = dir.join(format!("coordinator-{}.sh", stamp.as_millis()));
        let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        // `exec`: Slurm's SIGTERM (scancel, the time limit) reaches xlab itself, which stops
        // submitting and leaves the submitted jobs running, as Ctrl-C does.
        let body = format!(
            "#!/bin/bash\n# xlab: the coordinator of experiment `{experiment}` (`xlab run --detach`)\n\
             export XLAB_SERVE_NETWORK=1 XLAB_NO_LIVE=1\nexec {}\n",
            line.join(" ")
        );
        std::fs::write(&script, body).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        let mut c = Command::new("sbatch");
        c.arg("--parsable")
            .arg(format!("--job-name=xlab-coordinator-{experiment}"))
            .arg(format!("--chdir={}", cwd.display()))
            .arg("--no-requeue")
            .arg("--cpus-per-task=1")
            .arg(format!("--output={}", dir.join("coordinator-%j.out").display()));
        set_flags(&mut c, [("partition", &cfg.partition), ("account", &cfg.account), ("time", &cfg.coordinator_time)]);
        c.arg(&script);
        let id = sbatch(c)?;
        let record = Coordinator {
            output: dir.join(format!("coordinator-{id}.out")),
            slurm_job: id,
            experiment: experiment.to_string(),
            submitted_unix: stamp.as_secs(),
            command: argv.to_vec(),
        };
        let path = Self::path(store);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record).expect("a record serializes"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(record)
    }

    /// What `squeue` says of it: `None` once Slurm no longer lists it.
    pub fn state(&self) -> Result<Option<QueueEntry>, String> {
        queue().map(|mut q| q.remove(&self.slurm_job))
    }
}

/// This user's jobs as `squeue` lists them, finished ones included while Slurm still keeps
/// them, each array task on its own line.
pub fn queue() -> Result<HashMap<String, QueueEntry>, String> {
    let mut c = Command::new("squeue");
    c.args(["--noheader", "--me", "--array", "--states=all", "--format=%i|%T|%r|%N"]);
    let out = slurm_command(c)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            let id = f.next()?.trim().to_string();
            let state = f.next()?.trim().to_string();
            let reason = f.next().unwrap_or("").trim().to_string();
            let node = f.next().unwrap_or("").trim().to_string();
            Some((id, QueueEntry { state, reason, node }))
        })
        .collect())
}

/// What Slurm's output file says about how the job ended: the `*** JOB 12 ON node CANCELLED AT
/// … DUE TO TIME LIMIT ***` line slurmstepd writes, if there is one.
pub fn slurm_note(output: &Path) -> String {
    let text = std::fs::read_to_string(output).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("*** JOB") || l.contains("*** STEP"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

/// How a Slurm job ended when its worker did not say (or said only that it was stopped, which is
/// what SIGTERM from Slurm makes it say): a failure classified like its local counterpart, so
/// the retry policy resumes it from its last checkpoint.
pub fn classify(state: Option<&str>, note: &str) -> (FailureCause, String) {
    let state = match state {
        Some(s) => s.to_string(),
        None if note.contains("DUE TO TIME LIMIT") => "TIMEOUT".into(),
        None if note.contains("DUE TO PREEMPTION") => "PREEMPTED".into(),
        None if note.contains("DUE TO NODE FAILURE") => "NODE_FAIL".into(),
        None if note.contains("CANCELLED AT") => "CANCELLED".into(),
        None => String::new(),
    };
    let (cause, what) = match state.as_str() {
        "TIMEOUT" | "DEADLINE" => (FailureCause::Timeout, "reached its Slurm time limit (`time:`)".to_string()),
        "CANCELLED" => (FailureCause::Crashed, "was cancelled in Slurm (scancel, or an administrator)".into()),
        "PREEMPTED" => (FailureCause::Preempted, "was preempted by Slurm for a job of higher priority".into()),
        "NODE_FAIL" | "BOOT_FAIL" => (FailureCause::Crashed, "lost its node (Slurm: node failure)".into()),
        "OUT_OF_MEMORY" => (FailureCause::OutOfMemory, "ran out of host memory (Slurm's `mem:` limit)".into()),
        "" => (FailureCause::Crashed, "left Slurm's queue without a final report from its worker".into()),
        s => (FailureCause::Crashed, format!("ended in Slurm as {s} without a final report from its worker")),
    };
    (cause, if note.is_empty() { what } else { format!("{what}; Slurm says: {note}") })
}

/// A job the watcher follows.
#[derive(Debug, Clone)]
pub struct Watched {
    pub index: usize,
    pub id: String,
    pub events: PathBuf,
    pub output: PathBuf,
}

struct Tail {
    w: Watched,
    offset: u64,
    partial: Vec<u8>,
    /// The worker's last word (`finished` or `failed`) is in the file.
    reported: bool,
    /// When the queue first showed the job ended: the file gets a moment to catch up (a shared
    /// filesystem shows a node's last writes late).
    ended: Option<(Instant, Option<String>)>,
}

impl Tail {
    /// A job followed from the start of its event file.
    fn new(w: Watched) -> Self {
        Tail { w, offset: 0, partial: Vec::new(), reported: false, ended: None }
    }

    /// Sends the complete lines written since the last read.
    fn read(&mut self, tx: &Sender<Msg>) {
        let Ok(mut f) = std::fs::File::open(&self.w.events) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') else { return };
        let complete: Vec<u8> = self.partial.drain(..=last).collect();
        for line in String::from_utf8_lossy(&complete).lines().filter(|l| !l.is_empty()) {
            let msg = match Event::from_line(line) {
                Ok(e) => {
                    self.reported |= matches!(e, Event::Finished { .. } | Event::Failed { .. });
                    Msg::Event(self.w.index, e)
                }
                Err(_) => Msg::Noise(self.w.index, line.to_string()),
            };
            let _ = tx.send(msg);
        }
    }
}

/// Follows submitted jobs until the run drops `add`: their event files, and their state in the
/// queue every `poll`. A job that ended is reported once its file has its last word, or a few
/// polls after it ended without one.
pub fn watch(add: Receiver<Watched>, tx: Sender<Msg>, poll: Duration) {
    let settle = (poll * 3).max(Duration::from_secs(3));
    let mut tails: Vec<Tail> = Vec::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        match add.recv_timeout(poll) {
            Ok(w) => {
                tails.push(Tail::new(w));
                tails.extend(add.try_iter().map(Tail::new));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        for t in &mut tails {
            t.read(&tx);
        }
        if tails.is_empty() {
            continue;
        }
        let listed = match queue() {
            Ok(q) => {
                failing_since = None;
                q
            }
            Err(e) => {
                // Slurm's controller can be busy or restarting: keep the jobs and ask again.
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    tracing::warn!("squeue has not answered for {} s: {e}", since.elapsed().as_secs());
                }
                continue;
            }
        };
        let now = Instant::now();
        tails.retain_mut(|t| {
            // A packed job's worker that ended while its allocation runs on: its supervisor's
            // note says how, and the job is over now, not when its allocation is.
            let packed = xlab_proto::pack::PackExit::read(&t.w.events);
            if let Some(p) = packed.as_ref().filter(|p| !p.stopping) {
                t.read(&tx);
                let exit = Exit::Slurm {
                    id: t.w.id.clone(),
                    state: None,
                    note: String::new(),
                    started: true,
                    worker: Some(p.how.clone()),
                };
                let _ = tx.send(Msg::Exited(t.w.index, exit));
                return false;
            }
            let entry = listed.get(&t.w.id);
            if entry.is_some_and(|e| !e.ended()) {
                return true;
            }
            let (since, _) = t.ended.get_or_insert_with(|| (now, entry.map(|e| e.state.clone())));
            if !t.reported && now.duration_since(*since) < settle {
                return true;
            }
            t.read(&tx);
            let state = t.ended.as_ref().and_then(|(_, s)| s.clone());
            let note = slurm_note(&t.w.output);
            // The batch script creates the event file as it starts the worker: a job without
            // one never ran (cancelled while pending, or lost with the controller's state).
            let started = t.w.events.exists();
            let worker = packed.map(|p| p.how);
            let _ = tx.send(Msg::Exited(t.w.index, Exit::Slurm { id: t.w.id.clone(), state, note, started, worker }));
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_are_classified_like_local_failures() {
        assert_eq!(classify(Some("TIMEOUT"), "").0, FailureCause::Timeout);
        assert_eq!(classify(Some("CANCELLED"), "").0, FailureCause::Crashed);
        assert_eq!(classify(Some("OUT_OF_MEMORY"), "").0, FailureCause::OutOfMemory);
        let (cause, why) =
            classify(None, "slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***");
        assert_eq!(cause, FailureCause::Timeout);
        assert!(why.contains("time limit") && why.contains("DUE TO TIME LIMIT"), "{why}");
        let (cause, why) = classify(None, "*** JOB 7 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO PREEMPTION ***");
        assert!(cause == FailureCause::Preempted && why.contains("preempted"), "{why}");
        assert!(classify(None, "").1.contains("left Slurm's queue"));
    }

    #[test]
    fn queue_states_that_are_over() {
        let e = |s: &str| QueueEntry { state: s.into(), reason: String::new(), node: String::new() };
        assert!(!e("PENDING").ended() && !e("RUNNING").ended() && !e("COMPLETING").ended());
        assert!(e("COMPLETED").ended() && e("CANCELLED").ended() && e("NODE_FAIL").ended());
    }

    #[test]
    fn a_packs_time_and_memory_are_its_lanes_together() {
        assert_eq!(scaled_time("30", 2), "0-01:00:00");
        assert_eq!(scaled_time("10:30", 3), "0-00:31:30");
        assert_eq!(scaled_time("2:00:00", 13), "1-02:00:00");
        assert_eq!(scaled_time("1-12", 2), "3-00:00:00");
        assert_eq!(scaled_time("1-0:30", 2), "2-01:00:00");
        assert_eq!(scaled_time("UNLIMITED", 4), "UNLIMITED");
        assert_eq!(scaled_time("2:00:00", 1), "2:00:00");
        assert_eq!(scaled_mem("16G", 4), "64G");
        assert_eq!(scaled_mem("500", 2), "1000");
        assert_eq!(scaled_mem("16G", 1), "16G");
        assert_eq!(scaled_mem("lots", 2), "lots");
    }

    #[test]
    fn quoting_survives_any_path() {
        assert_eq!(quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn a_tail_sends_only_complete_lines_once() {
        let dir = std::env::temp_dir().join(format!("xlab-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = dir.join("events-1.jsonl");
        let line = Event::Metrics { step: 1, values: [("a".to_string(), 1.0)].into() }.to_line();
        std::fs::write(&events, format!("{line}\n{}", &line[..5])).unwrap();
        let w = Watched { index: 3, id: "1".into(), events: events.clone(), output: dir.join("1.out") };
        let mut t = Tail::new(w);
        let (tx, rx) = crossbeam_channel::unbounded();
        t.read(&tx);
        assert_eq!(rx.try_iter().count(), 1, "the unfinished second line waits");
        let done = Event::Finished { summary: Default::default() }.to_line();
        std::fs::write(&events, format!("{line}\n{line}\n{done}\n")).unwrap();
        t.read(&tx);
        let got: Vec<Msg> = rx.try_iter().collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(t.reported);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
