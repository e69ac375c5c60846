//! What one TPE proposal costs with 10², 10³ and 10⁴ finished trials behind it, over a space of
//! a float, a log-scaled float, an integer and a four-way choice (the shapes `random:` offers).
//! The history is a fixed pseudo-random one; the figure is the median of repeated proposals.
//!
//! `cargo bench -p xlab-sched --bench tpe` (or `make bench`); with `XLAB_BENCH_JSON=FILE` the
//! figures go there too.

use serde_json::json;
use std::time::Instant;
use xlab_sched::tpe::{suggest, trial_seed, Dim, Direction, State, Trial};

fn history(n: usize, space: &[Dim]) -> Vec<Trial> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let params: Vec<f64> = space
                .iter()
                .map(|d| match *d {
                    Dim::Float { low, high, log: false } => low + (high - low) * next(),
                    Dim::Float { low, high, log: true } => (low.ln() + (high.ln() - low.ln()) * next()).exp(),
                    Dim::Int { low, high } => {
                        (low as f64 + ((high - low + 1) as f64 * next()).floor()).min(high as f64)
                    }
                    Dim::Choice(k) => ((k as f64) * next()).floor(),
                })
                .collect();
            let value = params[0] * params[0] + params[1].ln().abs() * 0.1 + next() * 0.05;
            Trial { params, state: State::Complete(value) }
        })
        .collect()
}

fn main() {
    let space = [
        Dim::Float { low: 0.0, high: 1.0, log: false },
        Dim::Float { low: 1e-5, high: 1e-1, log: true },
        Dim::Int { low: 1, high: 64 },
        Dim::Choice(4),
    ];
    let mut rows = Vec::new();
    for n in [100usize, 1_000, 10_000] {
        let h = history(n, &space);
        let reps = if n >= 10_000 { 15 } else { 50 };
        let mut times: Vec<f64> = (0..reps)
            .map(|r| {
                let t0 = Instant::now();
                let p = suggest(&space, &h, Direction::Minimize, 10, trial_seed(0, (n + r) as u64));
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                assert_eq!(p.len(), space.len());
                ms
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("{n:>6} finished trials: {median:8.3} ms per proposal (median of {reps})");
        rows.push(json!({"trials": n, "dims": space.len(), "median_ms": median, "max_ms": times[times.len() - 1], "reps": reps}));
    }
    if let Ok(path) = std::env::var("XLAB_BENCH_JSON") {
        std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
