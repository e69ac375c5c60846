//! The worker's event stream: one JSON line per event on standard output, flushed at once.

use std::collections::BTreeMap;
use std::io::Write;
use xlab_proto::{Event, FailureCause};

pub struct Emitter {
    out: Box<dyn Write>,
}

impl Emitter {
    pub fn stdout() -> Self {
        Self { out: Box::new(std::io::stdout()) }
    }

    pub fn to_writer(out: Box<dyn Write>) -> Self {
        Self { out }
    }

    pub fn send(&mut self, e: &Event) {
        // If the coordinator is gone there is nobody to tell; the job ends with the process.
        let _ = writeln!(self.out, "{}", e.to_line()).and_then(|_| self.out.flush());
    }

    pub fn metrics(&mut self, step: u64, values: BTreeMap<String, f64>) {
        self.send(&Event::Metrics { step, values });
    }

    pub fn artifact(&mut self, name: &str, path: &str, kind: &str) {
        self.send(&Event::Artifact { name: name.into(), path: path.into(), kind: kind.into() });
    }

    pub fn failed(&mut self, cause: FailureCause, message: String) {
        self.send(&Event::Failed { cause, message });
    }
}
