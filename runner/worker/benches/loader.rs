//! The image-folder loader alone: decoding, conversion and resizing of every file of a folder
//! (`XLAB_BENCH_FOLDER`, a list of image files, one per line) to `XLAB_BENCH_SIZE` (HxW) on 1
//! and 2 threads, the median of 3 passes each. Writes JSON rows to `XLAB_BENCH_JSON`.
//! `bench/image_folder.py` writes the folder and runs this.

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let list = std::env::var("XLAB_BENCH_FOLDER").expect("XLAB_BENCH_FOLDER: a file listing the images");
    let files: Vec<PathBuf> = std::fs::read_to_string(&list).unwrap().lines().map(PathBuf::from).collect();
    let size: Vec<usize> = std::env::var("XLAB_BENCH_SIZE")
        .unwrap_or_else(|_| "32x32".into())
        .split('x')
        .map(|v| v.parse().expect("HxW"))
        .collect();
    let size = [size[0], size[1]];
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let mut times: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                let px = xlab_worker::images::load(&files, size, 3, threads).unwrap();
                assert_eq!(px.len(), files.len() * 3 * size[0] * size[1]);
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let s = times[1];
        println!(
            "{threads} thread(s): {:.0} images/s ({:.1} MB/s of files)",
            files.len() as f64 / s,
            bytes as f64 / s / 1e6
        );
        rows.push(serde_json::json!({
            "threads": threads, "images": files.len(), "seconds": times, "images_per_s": files.len() as f64 / s,
            "mb_per_s": bytes as f64 / s / 1e6,
        }));
    }
    if let Ok(out) = std::env::var("XLAB_BENCH_JSON") {
        std::fs::write(out, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
