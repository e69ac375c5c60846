//! A soak of the store: 10,000,000 metric points through the coordinator's write path in mixed
//! batch sizes (1, 3, 16, 64 and 7 steps per batch, in turn), flushed once a second as the
//! writer does, while two reader threads query the same store as `xlab query` and `xlab show`
//! do (one metric series; every series of a job). It looks for what a soak finds: a stall (the
//! longest single write or flush call is reported), throughput that decays as the log grows,
//! readers that starve the writer.
//!
//! `cargo bench -p xlab-store --bench soak` (`make bench` runs it). `XLAB_SOAK_POINTS` changes
//! the number of points; with `XLAB_BENCH_JSON=FILE` the figures also go there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use xlab_store::{ResultStore, Store};

fn main() {
    let total: u64 = std::env::var("XLAB_SOAK_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let (jobs, metrics) = (100u64, 10usize);
    let steps = total / (jobs * metrics as u64);
    let names: Vec<String> = (0..metrics).map(|i| format!("train.metric_{i}")).collect();
    let pattern = [1u64, 3, 16, 64, 7];
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let read_points = AtomicU64::new(0);
    let started = Instant::now();
    let (mut points, mut longest, mut longest_flush) = (0u64, Duration::ZERO, Duration::ZERO);
    // Throughput per tenth of the run, to see decay.
    let mut tenths: Vec<f64> = Vec::new();
    let (mut tenth_start, mut tenth_points) = (Instant::now(), 0u64);
    std::thread::scope(|s| {
        for r in 0..2u64 {
            let (store, done, reads, read_points, names) = (&store, &done, &reads, &read_points, &names);
            s.spawn(move || {
                let mut k = r;
                while !done.load(Ordering::Relaxed) {
                    k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let job = format!("{:016x}", (k >> 33) % jobs);
                    let n = if r == 0 {
                        store.metric_series(&job, &names[(k >> 40) as usize % names.len()]).unwrap().len()
                    } else {
                        store.metrics_of(&job).unwrap().values().map(Vec::len).sum()
                    };
                    reads.fetch_add(1, Ordering::Relaxed);
                    read_points.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
        let mut last_flush = Instant::now();
        let mut b = 0usize;
        // Jobs interleave, as a sweep's running jobs do: step ranges of every job in turn.
        let mut next_step = vec![0u64; jobs as usize];
        while next_step.iter().any(|&s| s < steps) {
            for (j, next) in next_step.iter_mut().enumerate() {
                if *next >= steps {
                    continue;
                }
                let per_batch = pattern[b % pattern.len()];
                b += 1;
                let lo = *next;
                let hi = (lo + per_batch).min(steps);
                let batch: Vec<(u64, BTreeMap<String, f64>)> = (lo..hi)
                    .map(|st| {
                        let v = names.iter().enumerate().map(|(i, n)| (n.clone(), (st * 31 + i as u64) as f64 * 1e-3));
                        (st, v.collect())
                    })
                    .collect();
                let n = (hi - lo) * metrics as u64;
                let t = Instant::now();
                store.put_metrics_batch(&format!("{j:016x}"), &batch).unwrap();
                longest = longest.max(t.elapsed());
                *next = hi;
                points += n;
                tenth_points += n;
                if last_flush.elapsed() >= Duration::from_secs(1) {
                    let t = Instant::now();
                    store.flush().unwrap();
                    longest_flush = longest_flush.max(t.elapsed());
                    last_flush = Instant::now();
                }
                if tenth_points >= total / 10 {
                    tenths.push(tenth_points as f64 / tenth_start.elapsed().as_secs_f64());
                    (tenth_start, tenth_points) = (Instant::now(), 0);
                }
            }
        }
        let t = Instant::now();
        store.flush().unwrap();
        longest_flush = longest_flush.max(t.elapsed());
        done.store(true, Ordering::Relaxed);
    });
    let secs = started.elapsed().as_secs_f64();
    // Every point is there.
    let check: usize = (0..jobs).map(|j| store.metric_series(&format!("{j:016x}"), &names[0]).unwrap().len()).sum();
    assert_eq!(check as u64, jobs * steps, "points lost");
    let (first, last) = (tenths.first().copied().unwrap_or(0.0), tenths.last().copied().unwrap_or(0.0));
    println!(
        "soak {points} points in mixed batches with 2 readers: {:.0} points/s ({secs:.1} s); first tenth {first:.0}/s, last \
         tenth {last:.0}/s; longest write {:.1} ms, longest flush {:.1} ms; {} reads ({} points read)",
        points as f64 / secs,
        longest.as_secs_f64() * 1e3,
        longest_flush.as_secs_f64() * 1e3,
        reads.load(Ordering::Relaxed),
        read_points.load(Ordering::Relaxed)
    );
    if let Ok(path) = std::env::var("XLAB_BENCH_JSON") {
        let json = format!(
            "{{\"points\": {points}, \"seconds\": {secs}, \"points_per_s\": {}, \"first_tenth_per_s\": {first}, \"last_tenth_per_s\": {last}, \"longest_write_ms\": {}, \"longest_flush_ms\": {}, \"reads\": {}, \"read_points\": {}}}",
            points as f64 / secs,
            longest.as_secs_f64() * 1e3,
            longest_flush.as_secs_f64() * 1e3,
            reads.load(Ordering::Relaxed),
            read_points.load(Ordering::Relaxed)
        );
        std::fs::write(path, json).unwrap();
    }
}
