//! `xlab-worker pack`: runs several jobs in one Slurm allocation (`executor: {slurm: {pack: N}}`),
//! `at_once` of them side by side (each on its own share of the allocation's GPUs) and the rest
//! as lanes free up. Each job is still its own worker process with its own event file, log and
//! request, so it keeps its identity, attempt record and failure class; the supervisor notes
//! beside each event file how the worker ended ([`xlab_proto::pack`]), so the coordinator need
//! not wait for the whole allocation to learn that one job is done.
//!
//! Slurm's SIGTERM (scancel, time limit, preemption) reaches every process of the allocation;
//! `--signal=B:TERM@T` reaches only this one. Either way the supervisor starts nothing more and
//! passes SIGUSR1 on, which asks a worker to stop at a checkpoint as SIGTERM does but is never
//! taken for a second SIGTERM (which would end it at once). Jobs not started by then stay
//! unstarted: they have no event file, and the coordinator submits them again.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xlab_proto::pack::{kill_request, PackExit};

/// What `pack` is told: lines `first..first+count` of the task list (`request\tevents\tlog`).
pub struct PackArgs {
    pub tasks: PathBuf,
    pub first: usize,
    pub count: usize,
    pub at_once: usize,
    pub gpus_per_job: usize,
}

struct Task {
    request: PathBuf,
    events: PathBuf,
    log: PathBuf,
}

struct Running {
    child: Child,
    lane: usize,
    task: usize,
    killed: bool,
}

fn tasks(args: &PackArgs) -> Result<Vec<Task>, String> {
    let text =
        std::fs::read_to_string(&args.tasks).map_err(|e| format!("cannot read {}: {e}", args.tasks.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(args.first).take(args.count) {
        let f: Vec<&str> = line.split('\t').collect();
        let [request, events, log] = f[..] else {
            return Err(format!(
                "{}:{}: expected request, events and log separated by tabs",
                args.tasks.display(),
                n + 1
            ));
        };
        out.push(Task { request: request.into(), events: events.into(), log: log.into() });
    }
    if out.is_empty() {
        return Err(format!("{} has no line {} (the pack's first job)", args.tasks.display(), args.first + 1));
    }
    Ok(out)
}

/// `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGUSR1 => " (SIGUSR1)",
                _ => "",
            };
            format!("was killed by signal {s}{name}")
        }
        (None, None) => format!("ended ({status})"),
    }
}

fn start(task: &Task, devices: &str) -> std::io::Result<Child> {
    let events = std::fs::File::create(&task.events)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&task.log)?;
    Command::new(std::env::current_exe()?)
        .arg("run")
        .arg("--job")
        .arg(&task.request)
        .env("CUDA_VISIBLE_DEVICES", devices)
        .env("XLAB_PARENT_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(events)
        .stderr(log)
        .spawn()
}

/// Runs the pack; the exit code of the supervisor (0 unless it could not run at all: each
/// job's own ending is in its note).
pub fn run(args: &PackArgs) -> i32 {
    let tasks = match tasks(args) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let lanes = args.at_once.clamp(1, tasks.len());
    // Each lane's GPUs: its share of those Slurm gave the allocation.
    let visible: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
        .unwrap_or_default()
        .split(',')
        .filter(|d| !d.trim().is_empty())
        .map(str::to_string)
        .collect();
    let g = args.gpus_per_job;
    if g > 0 && visible.len() < g * lanes {
        tracing::warn!(
            "the allocation shows {} GPU(s) ({visible:?}) for {lanes} job(s) of {g} GPU(s) at once; lanes share them",
            visible.len()
        );
    }
    let lane_devices = |lane: usize| -> String {
        if g == 0 || visible.is_empty() {
            return String::new();
        }
        (0..g).map(|k| visible[(lane * g + k) % visible.len()].clone()).collect::<Vec<_>>().join(",")
    };
    tracing::info!("pack of {} job(s), {lanes} at once", tasks.len());
    let mut running: Vec<Running> = Vec::new();
    let mut next = 0;
    let mut stopping = false;
    loop {
        if !stopping && stop.load(Ordering::SeqCst) {
            stopping = true;
            tracing::warn!(
                "signalled: starting none of the {} job(s) left; asking {} running one(s) to stop at a checkpoint",
                tasks.len() - next,
                running.len()
            );
            for r in &running {
                // SAFETY: kill(2) on a child this process has not reaped yet.
                unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGUSR1) };
            }
        }
        running.retain_mut(|r| {
            let task = &tasks[r.task];
            if !r.killed && kill_request(&task.events).exists() {
                tracing::warn!("killing the worker of {} as the coordinator asked", task.request.display());
                let _ = r.child.kill();
                r.killed = true;
            }
            match r.child.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    let note = PackExit { how: describe(status), stopping };
                    if let Err(e) = note.write(&task.events) {
                        tracing::error!("cannot note how {} ended: {e}", task.events.display());
                    }
                    false
                }
                Err(e) => {
                    let note = PackExit { how: format!("could not be waited for: {e}"), stopping };
                    let _ = note.write(&task.events);
                    false
                }
            }
        });
        while !stopping && running.len() < lanes && next < tasks.len() {
            let lane = (0..lanes).find(|l| running.iter().all(|r| r.lane != *l)).expect("a free lane");
            let task = &tasks[next];
            match start(task, &lane_devices(lane)) {
                Ok(child) => running.push(Running { child, lane, task: next, killed: false }),
                Err(e) => {
                    tracing::error!("cannot start the worker of {}: {e}", task.request.display());
                    let _ = PackExit { how: format!("could not start: {e}"), stopping }.write(&task.events);
                }
            }
            next += 1;
        }
        if running.is_empty() && (stopping || next == tasks.len()) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
