//! `xlab-worker`: started by `xlab` once per job; not meant to be run by hand, except
//! `xlab-worker probe`, which prints what libtorch and devices this worker sees.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use xlab_worker::events::Emitter;

#[derive(Parser)]
#[command(name = "xlab-worker", version, about = "Runs one xlab job (started by `xlab run`)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the job described by a job request file; events go to standard output as JSON lines.
    Run {
        #[arg(long)]
        job: PathBuf,
    },
    /// Start (loading libtorch, which takes a while), then wait for one job: the path of its
    /// request file on standard input; run it as `run --job` would. End quietly if standard
    /// input closes first. The coordinator keeps one ready per slot so jobs start at once.
    Standby,
    /// Run several jobs in one Slurm allocation: lines FIRST+1 to FIRST+COUNT of a task list
    /// (`request<TAB>events<TAB>log`), AT_ONCE of them side by side and the rest as they end,
    /// noting beside each event file how its worker ended. Started by xlab's Slurm batch scripts.
    Pack {
        #[arg(long)]
        tasks: PathBuf,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        at_once: usize,
        /// GPUs of each job, taken in turn from the allocation's `CUDA_VISIBLE_DEVICES`.
        #[arg(long, default_value_t = 0)]
        gpus_per_job: usize,
    },
    /// Print the libtorch version and location and the devices it sees, as JSON.
    Probe,
    /// The outputs of a trained weights file (its model rebuilt from the file's metadata) on
    /// the inputs of a safetensors file (`x`, and `t`, `y` for a diffusion model), written as
    /// `out` to another: for checking another implementation of a model against xlab's. With
    /// `--precision bf16|fp16`, under autocast; with a `target` input (diffusion models), also
    /// the training loss (`loss`) and its gradients (`grad.<parameter>`).
    Forward {
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// fp32, bf16 or fp16
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// An attention guidance for a UNet with cross-attention, as a job names it (e.g.
        /// `{"use": "diffusion.nag", "scale": 5}`), from the installed plugins: the first rows
        /// (as many as the `y_neg` input's labels) attend over `y_neg`'s tokens too. `t` is then
        /// one timestep for the whole batch (its first value) in 0..=T−1.
        #[arg(long)]
        attention: Option<String>,
    },
    /// Load every plugin from the default folders plus those given, and print the registry as
    /// JSON (plugins with their components and parameter schemas, and refused files with why).
    /// Check jobs before a run (a JSON list of `JobCheck` on standard input): read their data,
    /// build their models, construct and set up their components. Prints the failures as JSON.
    Check,
    Plugins {
        /// Extra folders to search for `libxlab_plugin_*.so`.
        #[arg(long)]
        dir: Vec<PathBuf>,
        /// Extra plugin library files.
        #[arg(long)]
        file: Vec<PathBuf>,
    },
}

fn main() {
    xlab_worker::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XLAB_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.command {
        Command::Probe => {
            println!("{}", xlab_worker::probe::report());
        }
        Command::Forward { weights, input, out, precision, attention } => {
            let precision = match serde_json::from_value(serde_json::Value::String(precision.clone())) {
                Ok(p) => p,
                Err(_) => {
                    eprintln!("error: --precision {precision}: expected fp32, bf16 or fp16");
                    quit(2);
                }
            };
            if let Err(e) = xlab_worker::forward::run(&weights, &input, &out, precision, attention.as_deref()) {
                eprintln!("error: {e}");
                quit(1);
            }
            quit(0);
        }
        Command::Plugins { mut dir, file } => {
            let mut dirs = xlab_worker::default_plugin_dirs();
            dirs.append(&mut dir);
            let (_, registry) = xlab_plugin_host::discover(&dirs, &file);
            println!("{}", serde_json::to_string(&registry).expect("the registry serializes"));
        }
        Command::Check => {
            let jobs: Vec<xlab_proto::plugins::JobCheck> = match serde_json::from_reader(std::io::stdin()) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("bad check request: {e}");
                    std::process::exit(2);
                }
            };
            println!("{}", serde_json::to_string(&xlab_worker::check::check(&jobs)).expect("failures serialize"));
            quit(0);
        }
        Command::Run { job } => {
            xlab_worker::exit_with_parent();
            xlab_worker::stop_on_signals();
            quit(run(&job));
        }
        Command::Pack { tasks, first, count, at_once, gpus_per_job } => {
            let args = xlab_worker::pack::PackArgs { tasks, first, count, at_once, gpus_per_job };
            quit(xlab_worker::pack::run(&args));
        }
        Command::Standby => {
            xlab_worker::exit_with_parent();
            xlab_worker::stop_on_signals();
            let mut line = String::new();
            match std::io::stdin().read_line(&mut line) {
                Ok(n) if n > 0 && !line.trim().is_empty() => {
                    let job = PathBuf::from(line.trim());
                    // From here on this worker's log is the job's.
                    if let Some(dir) = job.parent() {
                        if let Err(e) = xlab_worker::log_to(&dir.join("worker.log")) {
                            tracing::warn!("cannot log to {}: {e}", dir.display());
                        }
                    }
                    quit(run(&job));
                }
                _ => std::process::exit(0),
            }
        }
    }
}

/// Ends the worker once its job is over. Everything the job wrote is durable (files are synced
/// before they are reported), so after its report and log are flushed, the process skips
/// libtorch's teardown (about 0.15 s, during which its slot would sit idle).
fn quit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; nothing after it runs, and no state other
    // processes see is left half-written (see above).
    unsafe { libc::_exit(code) }
}

/// Runs the job of a request file; returns the exit code.
fn run(job: &std::path::Path) -> i32 {
    let mut out = Emitter::stdout();
    let req = std::fs::read(job)
        .map_err(|e| format!("cannot read job request {}: {e}", job.display()))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("bad job request {}: {e}", job.display())));
    match req {
        Ok(req) => xlab_worker::run_job(&req, &mut out),
        Err(message) => {
            tracing::error!("{message}");
            out.failed(xlab_proto::FailureCause::Config, message);
            2
        }
    }
}
