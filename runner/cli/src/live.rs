//! The live view of `xlab run` on a terminal: an overall bar (done, running, queued, failed,
//! ETA) and a bar per running job (stage, swept values, device, epoch, loss, rate). Log lines
//! print above the bars. Without a terminal, `xlab run` writes plain log lines only.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::OnceLock;

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Whether the live view draws: standard error is a terminal and the logs are for humans.
pub fn wanted(human_logs: bool) -> bool {
    human_logs && std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("XLAB_NO_LIVE").is_none()
}

/// Standard error for the logger: lines go above the bars while they are drawn.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(mp) => mp.suspend(|| std::io::stderr().write_all(buf)).map(|_| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

pub struct Live {
    mp: &'static MultiProgress,
    overall: ProgressBar,
    jobs: HashMap<String, ProgressBar>,
    running: usize,
    failed: usize,
    total: usize,
}

impl Live {
    pub fn start(total: usize) -> Live {
        let mp = BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = mp.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} jobs {msg} [{elapsed_precise}, ETA {eta}]")
                .expect("a valid template")
                .progress_chars("█▉▊▋▌▍▎▏ "),
        );
        Live { mp, overall, jobs: HashMap::new(), running: 0, failed: 0, total }
    }

    fn summary(&self) {
        let queued = self.total.saturating_sub(self.overall.position() as usize + self.running);
        let failed = if self.failed > 0 { format!(", {} failed", self.failed) } else { String::new() };
        self.overall.set_message(format!("({} running, {queued} queued{failed})", self.running));
    }

    pub fn started(&mut self, id: &str, what: String, epochs: u64) {
        let bar = self.mp.insert_before(&self.overall, ProgressBar::new(epochs.max(1)));
        bar.set_style(
            ProgressStyle::with_template("  {prefix} {bar:15} epoch {pos}/{len} {msg}").expect("a valid template"),
        );
        bar.set_prefix(what);
        self.jobs.insert(id.to_string(), bar);
        self.running += 1;
        self.summary();
    }

    pub fn metrics(&mut self, id: &str, epoch: u64, values: &BTreeMap<String, f64>) {
        if let Some(bar) = self.jobs.get(id) {
            bar.set_position(epoch);
            let mut parts = Vec::new();
            for (k, short) in [("train.loss", "loss"), ("val.acc", "val.acc"), ("test.acc", "test.acc")] {
                if let Some(v) = values.get(k) {
                    parts.push(format!("{short} {v:.4}"));
                }
            }
            if let Some(r) = values.get("time.steps_per_s") {
                parts.push(format!("{r:.0} steps/s"));
            }
            bar.set_message(parts.join(", "));
        }
    }

    /// A job stopped running; `counts` whether it is finished for good (done or failed).
    pub fn ended(&mut self, id: &str, counts: bool, failed: bool) {
        if let Some(bar) = self.jobs.remove(id) {
            bar.finish_and_clear();
            self.mp.remove(&bar);
            self.running = self.running.saturating_sub(1);
        }
        if counts {
            self.overall.inc(1);
        }
        if failed {
            self.failed += 1;
        }
        self.summary();
    }

    pub fn skipped(&mut self) {
        self.overall.inc(1);
        self.summary();
    }

    pub fn finish(self) {
        for bar in self.jobs.values() {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
        let _ = self.mp.clear();
    }
}
