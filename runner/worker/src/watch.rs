//! The worker's watch over its own training steps.
//!
//! - **Where it is.** `progress` in the run folder (see `xlab_proto::progress`) is mapped into
//!   memory; each training step stores its number there and every plugin call its label, so
//!   that whatever kills the process, the coordinator can read where (a segfault at step 3,
//!   inside `fixture.crashes` step) and recognise a crash that repeats at the same place.
//! - **Whether it moves.** With a step limit (`step_timeout:`, 30 minutes unless the stage says
//!   otherwise), a thread checks that no step runs longer; one that does ends the job as `hung`,
//!   naming the plugin call it is stuck in, instead of holding its slot forever.
//!
//! The limit covers training steps (the batch transform, the step rule with its passes, the
//! objective, the optimizer), not evaluation or checkpoints between them; in a sampling job, the
//! time from one denoiser evaluation to the next (so a sampler plugin that stops is caught).

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use xlab_proto::progress::{self, call_bytes};
use xlab_proto::{Event, FailureCause};

/// The mapped `progress` file ([`progress::SIZE`] bytes), or null before [`start`].
static MAP: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// When the current step began, in ms since [`BASE`] + 1; 0 between steps.
static ARMED: AtomicU64 = AtomicU64::new(0);
static STEP: AtomicU64 = AtomicU64::new(0);
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// Whether the steps are a sampler's denoiser evaluations rather than training steps.
static SAMPLING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static BASE: OnceLock<Instant> = OnceLock::new();
/// The plugin call in progress, for the hung message.
static CALL: Mutex<String> = Mutex::new(String::new());

fn now_ms() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Writes `bytes` at `offset` of the mapped file, if it is mapped.
fn put(offset: usize, bytes: &[u8]) {
    let p = MAP.load(Ordering::Acquire);
    if p.is_null() || offset + bytes.len() > progress::SIZE {
        return;
    }
    // SAFETY: the map is SIZE bytes long, never unmapped, and the range was checked above.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(offset), bytes.len()) };
}

/// Maps a fresh `progress` file in `run_dir`, has the plugin host report its calls, and with a
/// `limit` starts the step watchdog. Errors are not fatal to the job (the caller logs them).
pub fn start(run_dir: &Path, limit: Option<Duration>) -> Result<(), String> {
    BASE.get_or_init(Instant::now);
    map(&run_dir.join(progress::FILE))?;
    xlab_plugin_host::on_plugin_calls(on_call);
    if let Some(limit) = limit {
        std::thread::Builder::new()
            .name("step-watchdog".into())
            .spawn(move || watchdog(limit))
            .map_err(|e| format!("cannot start the step watchdog: {e}"))?;
    }
    Ok(())
}

fn map(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut initial = vec![0u8; progress::SIZE];
    initial[..8].copy_from_slice(progress::MAGIC);
    std::fs::write(path, &initial).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: a shared read-write mapping of a file this process just wrote SIZE bytes to; the
    // mapping stays valid after the descriptor closes, and it is never unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            progress::SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("cannot map {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    MAP.store(p.cast(), Ordering::Release);
    Ok(())
}

/// A training step begins: `step` is the run's global step (0-based), `epoch` 0-based.
pub fn step_begins(epoch: u64, step: u64) {
    STEP.store(step, Ordering::Relaxed);
    EPOCH.store(epoch, Ordering::Relaxed);
    put(progress::EPOCH, &epoch.to_le_bytes());
    put(progress::STEP, &(step + 1).to_le_bytes());
    ARMED.store(now_ms() + 1, Ordering::Release);
}

/// A sampling job is about to ask its denoiser for evaluation `k` (0-based): for the watchdog,
/// each evaluation is a step of the sampler, so a sampler that stops asking is caught too.
pub fn evaluation_begins(k: u64) {
    SAMPLING.store(true, Ordering::Relaxed);
    step_begins(0, k);
}

/// The step ended (or failed): the watchdog rests until the next.
pub fn step_ends() {
    ARMED.store(0, Ordering::Release);
}

/// The plugin host's report of the call in progress (`None` when none is).
fn on_call(label: Option<&str>) {
    let bytes = call_bytes(label.unwrap_or(""));
    put(progress::CALL, bytes);
    put(progress::CALL_LEN, &(bytes.len() as u16).to_le_bytes());
    let mut c = CALL.lock().unwrap_or_else(|e| e.into_inner());
    c.clear();
    c.push_str(label.unwrap_or(""));
}

fn watchdog(limit: Duration) {
    let tick = (limit / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let limit_ms = limit.as_millis() as u64;
    loop {
        std::thread::sleep(tick);
        let armed = ARMED.load(Ordering::Acquire);
        if armed == 0 || now_ms() + 1 - armed <= limit_ms {
            continue;
        }
        let call = CALL.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (step, epoch) = (STEP.load(Ordering::Relaxed), EPOCH.load(Ordering::Relaxed));
        let inside = if call.is_empty() {
            "in the worker itself (forward, backward or the optimizer), in no plugin call".to_string()
        } else {
            format!("inside {call}")
        };
        let what = match SAMPLING.load(Ordering::Relaxed) {
            true => format!("the sampler, at denoiser evaluation {step},"),
            false => format!("step {step} (epoch {})", epoch + 1),
        };
        let message = format!(
            "{what} made no progress for {}, {inside}; a step that slow is taken as hung (`step_timeout:` on the \
             stage raises the limit)",
            human(limit)
        );
        tracing::error!("{message}");
        let line = Event::Failed { cause: FailureCause::Hung, message }.to_line();
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}").and_then(|_| out.flush());
        }
        // The stuck thread may hold any lock: leave without running destructors.
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(1) };
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{} min", s / 60.0)
    } else {
        format!("{s} s")
    }
}
