//! A small mutational fuzzer for xlab's parsers: the experiment-file front end, the query filter
//! language, the worker's event stream, and the NPZ, CSV and IDX readers.
//!
//! Each target is a function from bytes to an outcome (`Ok`, or an error's text) that must never
//! panic. The fuzzer starts from the target's corpus (`fuzz/corpus/<target>/` in the
//! repository: hand-written valid and broken inputs), and each round mutates a corpus entry
//! (bit flips, byte edits, chunk deletions, duplications and splices, tokens from the target's
//! dictionary, interesting numbers) with a seeded generator, so a run is reproducible from its
//! seed. The input being tried is also in `fuzz/crashes/<target>/last-input` while it runs, so
//! one that aborts the process (a failed allocation) is found there. An input whose outcome is new (the error's text with its numbers and quoted parts
//! blanked, a cheap stand-in for new code reached) joins the corpus in memory, and with
//! `save` on disk too, so the next run starts from there. A panic is caught, counted, and its
//! input written to `fuzz/crashes/<target>/`.
//!
//! `make fuzz` runs every target for a fixed time (see the Makefile); `make test` runs each for
//! a few thousand inputs, so a panic introduced in a parser fails the ordinary test suite too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a run goes on: whichever of the two limits comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub inputs: u64,
    pub time: Duration,
}

impl Budget {
    /// From `XLAB_FUZZ_INPUTS` and `XLAB_FUZZ_SECONDS`, else `inputs` inputs with no time limit.
    pub fn from_env(inputs: u64) -> Budget {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Budget {
            inputs: env("XLAB_FUZZ_INPUTS").unwrap_or(if env("XLAB_FUZZ_SECONDS").is_some() {
                u64::MAX
            } else {
                inputs
            }),
            time: Duration::from_secs(env("XLAB_FUZZ_SECONDS").unwrap_or(u64::MAX / 4)),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    pub panics: u64,
    pub seconds: f64,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    pub corpus_start: usize,
    /// The corpus at the end, in memory (at most [`MAX_CORPUS`]).
    pub corpus_end: usize,
    /// Where the panicking inputs were written.
    pub crashes: Vec<PathBuf>,
}

impl Report {
    /// One JSON object, for `bench/results/fuzz.json`.
    pub fn json(&self) -> String {
        format!(
            "{{\"target\": \"{}\", \"inputs\": {}, \"panics\": {}, \"seconds\": {:.1}, \"inputs_per_s\": {:.0}, \"outcomes\": {}, \"corpus_start\": {}, \"corpus_end\": {}}}",
            self.target,
            self.inputs,
            self.panics,
            self.seconds,
            self.inputs as f64 / self.seconds.max(1e-9),
            self.outcomes,
            self.corpus_start,
            self.corpus_end
        )
    }
}

/// The repository's `fuzz/` folder.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1e308",
    b"-0",
    b"nan",
    b"inf",
    b"4294967296",
    b"18446744073709551616",
    b"9223372036854775807",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\x7f\xff\xff\xff",
    b"\x80\x00\x00\x00",
    b"",
    b"\n",
    b"\"",
    b"'",
    b"\\",
    b"\xce\xbb",
];

/// The most inputs a run keeps in memory to mutate.
const MAX_CORPUS: usize = 4096;

/// Mutates `input` in place: one to four edits.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let (a, n) = (rng.below(len), 1 + rng.below(16));
                input.drain(a..(a + n).min(len));
            }
            3 if len > 0 => {
                let (a, n) = (rng.below(len), 1 + rng.below(32));
                let chunk: Vec<u8> = input[a..(a + n).min(len)].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            4 | 5 if !dict.is_empty() => {
                let token = dict[rng.below(dict.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, token.iter().copied());
            }
            6 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(len + 1);
                // Replace a run of digits or bytes there, or insert.
                let end = (at + rng.below(4)).min(len);
                input.splice(at..end, token.iter().copied());
            }
            7 if !corpus.is_empty() => {
                // Splice: our head, another entry's tail.
                let other = &corpus[rng.below(corpus.len())];
                let (a, b) = (rng.below(len + 1), rng.below(other.len() + 1));
                input.truncate(a);
                input.extend_from_slice(&other[b..]);
            }
            8 if len > 0 => {
                let a = rng.below(len);
                input.truncate(a.max(1));
            }
            _ => {
                let at = rng.below(len + 1);
                input.insert(at, rng.next() as u8);
            }
        }
        if input.len() > 1 << 16 {
            input.truncate(1 << 16);
        }
    }
}

/// An outcome's shape: the words of its first clause (up to `;` or a line break, where xlab's
/// messages put their details), without quoted parts, numbers, punctuation, repeats, or words the
/// input also holds (a stage's name, a key, a value echoed back). So "line 3" and "line 7",
/// "unknown field `a`" and "unknown field `b`", or dimensions `[2, 3]` and `[2, 3, 4]` are one
/// outcome, but a different message is another.
pub fn shape(outcome: &str, input: &[u8]) -> String {
    let head = outcome.split(['\n', ';']).next().unwrap_or_default();
    let mut bare = String::with_capacity(head.len());
    let mut quote: Option<char> = None;
    for c in head.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '"' => quote = Some(c),
            None => bare.push(c),
        }
    }
    let text = String::from_utf8_lossy(input);
    let echoed: HashSet<&str> = text.split(|c: char| !c.is_alphabetic()).collect();
    let mut words: Vec<&str> = Vec::new();
    for w in bare.split(|c: char| !c.is_alphabetic()) {
        if w.len() > 1 && !echoed.contains(w) && words.last() != Some(&w) {
            words.push(w);
        }
    }
    words.join(" ")
}

/// Reads a target's corpus folder (every file, sorted by name).
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("corpus").join(target);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn hash(b: &[u8]) -> String {
    // FNV-1a: a stable file name for an input.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Runs `target` on the corpus entries, then on mutations of them, until the budget is spent.
/// `save`: write inputs with new outcomes into the corpus folder (at most 256 new files a run).
pub fn run(
    name: &str,
    dict: &[&[u8]],
    budget: Budget,
    seed: u64,
    save: bool,
    mut target: impl FnMut(&[u8]) -> Result<(), String>,
) -> Report {
    let mut corpus = corpus(name);
    assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ is empty: a target needs at least one seed input");
    let corpus_start = corpus.len();
    let crash_dir = root().join("crashes").join(name);
    let corpus_dir = root().join("corpus").join(name);
    let mut seen: HashSet<String> = HashSet::new();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let started = Instant::now();
    let (mut inputs, mut panics, mut saved) = (0u64, 0u64, 0usize);
    let mut crashes = Vec::new();
    // Quiet the default panic message: a caught panic is reported once, with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = std::fs::create_dir_all(&crash_dir);
    let last = std::fs::File::create(crash_dir.join("last-input")).ok();
    let mut input = Vec::new();
    let mut k = 0usize;
    while inputs < budget.inputs && (inputs % 256 != 0 || started.elapsed() < budget.time) {
        input.clear();
        if k < corpus_start {
            input.extend_from_slice(&corpus[k]);
        } else {
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            mutate(&mut rng, &mut input, &corpus, dict);
        }
        k += 1;
        inputs += 1;
        // An abort (a failed allocation) ends the process without unwinding: the input it
        // came from is then the one in `last-input`.
        if let Some(f) = &last {
            use std::os::unix::fs::FileExt;
            let _ = f.set_len(0).and_then(|_| f.write_all_at(&input, 0));
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        match outcome {
            Ok(r) => {
                let s = shape(
                    &match r {
                        Ok(()) => "ok".to_string(),
                        Err(e) => e,
                    },
                    &input,
                );
                if seen.insert(s) && k > corpus_start {
                    // A bounded corpus: past its size, a new entry takes a random old one's
                    // place (the seed inputs stay).
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input.clone());
                    } else {
                        let at = corpus_start + rng.below(corpus.len() - corpus_start);
                        corpus[at] = input.clone();
                    }
                    if save && saved < 256 {
                        let _ = std::fs::create_dir_all(&corpus_dir);
                        if std::fs::write(corpus_dir.join(hash(&input)), &input).is_ok() {
                            saved += 1;
                        }
                    }
                }
            }
            Err(payload) => {
                panics += 1;
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let _ = std::fs::create_dir_all(&crash_dir);
                let path = crash_dir.join(hash(&input));
                let _ = std::fs::write(&path, &input);
                eprintln!("fuzz {name}: panic on {}: {message}", path.display());
                crashes.push(path);
            }
        }
    }
    std::panic::set_hook(hook);
    drop(last);
    let _ = std::fs::remove_file(crash_dir.join("last-input"));
    let _ = std::fs::remove_dir(&crash_dir);
    Report {
        target: name.to_string(),
        inputs,
        panics,
        seconds: started.elapsed().as_secs_f64(),
        outcomes: seen.len(),
        corpus_start,
        corpus_end: corpus.len(),
        crashes,
    }
}

/// Runs a target as a test: the budget from the environment (`make fuzz`) or `default_inputs`;
/// writes the report to `XLAB_FUZZ_REPORT` (a JSON-lines file) when set; fails on any panic.
pub fn check(name: &str, dict: &[&[u8]], default_inputs: u64, target: impl FnMut(&[u8]) -> Result<(), String>) {
    let budget = Budget::from_env(default_inputs);
    let seed = std::env::var("XLAB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let save = std::env::var_os("XLAB_FUZZ_SAVE").is_some();
    let report = run(name, dict, budget, seed, save, target);
    eprintln!(
        "fuzz {name}: {} inputs in {:.1} s, {} panics, {} outcomes, corpus {} → {}",
        report.inputs, report.seconds, report.panics, report.outcomes, report.corpus_start, report.corpus_end
    );
    if let Some(path) = std::env::var_os("XLAB_FUZZ_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("the report file opens");
        writeln!(f, "{}", report.json()).expect("the report is written");
    }
    assert_eq!(report.panics, 0, "fuzz {name}: inputs that panic are in {:?}", report.crashes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_blank_numbers_and_quotes() {
        assert_eq!(shape("x.yaml:3:14: unknown key `rh0`", b""), shape("x.yaml:12:1: unknown key `foo`", b""));
        assert_eq!(shape("dimensions [2, 3] differ", b""), shape("dimensions [2, 3, 4, 5] differ", b""));
        assert_ne!(shape("unknown key `a`", b""), shape("bad value `a`", b""));
        // Words the input holds are its own, not the message's.
        assert_eq!(shape("stages.erm: bad", b"erm: {}"), shape("stages.sam: bad", b"sam: {}"));
        assert_ne!(shape("stages.erm: bad", b"erm: {}"), shape("stages.erm: good", b"erm: {}"));
    }

    #[test]
    fn mutations_are_reproducible_from_the_seed() {
        let corpus = vec![b"name: x\nstages: {}\n".to_vec()];
        let runs: Vec<Vec<Vec<u8>>> = (0..2)
            .map(|_| {
                let mut rng = Rng(7);
                (0..50)
                    .map(|_| {
                        let mut v = corpus[0].clone();
                        mutate(&mut rng, &mut v, &corpus, &[b"seeds: "]);
                        v
                    })
                    .collect()
            })
            .collect();
        assert_eq!(runs[0], runs[1]);
        assert!(runs[0].iter().any(|v| v != &corpus[0]));
    }
}
