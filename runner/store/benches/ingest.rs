//! Metric ingestion into a real sled store on disk: points per second sustained through the
//! store's batched write path, and bytes on disk per million points.
//!
//! `cargo bench -p xlab-store --bench ingest` (or `make bench`). Writes 1,000,000 points: 100
//! jobs × 10 metrics × 1,000 steps, one batch per (job, step) as the coordinator's writer does,
//! and with 16 and 64 steps per batch (what the writer coalesces when points arrive faster),
//! flushing once a second as the writer does.
//! With `XLAB_BENCH_JSON=FILE`, also writes the figures there (`bench/store.py` does, for
//! BENCHMARKS.md).

use std::collections::BTreeMap;
use std::time::Instant;
use xlab_store::{ResultStore, Store};

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        dir_size(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let jobs: u64 = std::env::var("XLAB_BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let (metrics, steps) = (10usize, 1000u64);
    let names: Vec<String> = (0..metrics).map(|i| format!("train.metric_{i}")).collect();
    let sizes: Vec<u64> = std::env::var("XLAB_BENCH_BATCH")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![64, 16, 1]);
    let mut rows = Vec::new();
    for per_batch in sizes {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let start = Instant::now();
        let mut last_flush = Instant::now();
        let mut points = 0u64;
        for j in 0..jobs {
            let id = format!("{j:016x}");
            let mut step = 0;
            while step < steps {
                let mut batch: Vec<(u64, BTreeMap<String, f64>)> = Vec::new();
                for s in step..(step + per_batch).min(steps) {
                    let values: BTreeMap<String, f64> =
                        names.iter().enumerate().map(|(i, n)| (n.clone(), (s * 31 + i as u64) as f64 * 1e-3)).collect();
                    points += values.len() as u64;
                    batch.push((s, values));
                }
                store.put_metrics_batch(&id, &batch).unwrap();
                step += per_batch;
                // As the coordinator's writer does: durable at least once a second while points
                // arrive.
                if last_flush.elapsed().as_secs_f64() >= 1.0 {
                    store.flush().unwrap();
                    last_flush = Instant::now();
                }
            }
        }
        store.flush().unwrap();
        let secs = start.elapsed().as_secs_f64();
        drop(store);
        let bytes = dir_size(dir.path());
        println!(
            "ingest {points} points, {per_batch} step(s) per batch: {:.0} points/s ({secs:.2} s), {:.1} MB on disk per million points",
            points as f64 / secs,
            bytes as f64 / 1e6 / (points as f64 / 1e6)
        );
        rows.push(format!(
            "{{\"steps_per_batch\": {per_batch}, \"points\": {points}, \"seconds\": {secs}, \"points_per_s\": {}, \"bytes\": {bytes}, \"bytes_per_point\": {}}}",
            points as f64 / secs,
            bytes as f64 / points as f64
        ));
    }
    if let Some(path) = std::env::var_os("XLAB_BENCH_JSON") {
        std::fs::write(&path, format!("[{}]\n", rows.join(",\n"))).expect("the JSON file is writable");
    }
}
