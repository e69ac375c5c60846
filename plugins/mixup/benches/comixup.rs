//! Co-Mixup's per-batch cost: milliseconds to mix one batch of 100 CIFAR-sized images
//! (3×32×32, 10 classes) in partitions of 20, at 4, 8 and 16 blocks per side, through the real
//! plugin boundary. The saliency gradient is a fixed formula the host hands over, so only the
//! transform's own work is timed (pooling, the graph-cut search, mixing). `bench/comixup.py`
//! times the PyTorch + gco version of the reference algorithm on the same inputs.
//!
//! `cargo bench -p xlab-plugin-mixup --bench comixup` (or `make bench`); with
//! `XLAB_BENCH_JSON=FILE` the figures go there too.

use serde_json::json;
use std::time::Instant;
use xlab_plugin_api::tch::{Device, Kind, Tensor};
use xlab_plugin_api::RunInfo;
use xlab_plugin_host as host;
use xlab_plugin_host::testing::{built_plugin, instantiate, SplitMix};

const B: i64 = 100;
const SIDE: i64 = 32;
const CLASSES: i64 = 10;

/// The inputs and the saliency gradient, from formulas `bench/comixup.py` shares.
fn inputs() -> (Tensor, Tensor, Tensor) {
    let n = B * 3 * SIDE * SIDE;
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let x = (&i * 0.013).sin().reshape([B, 3 * SIDE * SIDE]);
    // A smooth bump per image at a place that depends on the image, plus texture.
    let pix = Tensor::arange(SIDE * SIDE, (Kind::Double, Device::Cpu));
    let (r, c) = (pix.divide_scalar_mode(SIDE, "floor"), pix.remainder(SIDE));
    let b = Tensor::arange(B, (Kind::Double, Device::Cpu)).unsqueeze(1);
    let (cr, cc) = ((&b * 7.0).remainder(SIDE), (&b * 13.0).remainder(SIDE));
    let bump = (-((r.unsqueeze(0) - cr).square() + (c.unsqueeze(0) - cc).square()) / 40.0).exp();
    let g = (bump.unsqueeze(1) * (&i * 0.031).cos().reshape([B, 3, SIDE * SIDE])).reshape([B, 3 * SIDE * SIDE]);
    let y = Tensor::arange(B, (Kind::Int64, Device::Cpu)).remainder(CLASSES);
    (x, y, g)
}

fn main() {
    let plugin = host::load(&built_plugin("xlab_plugin_mixup")).expect("the mixup plugin");
    let info = RunInfo { num_classes: CLASSES, n_train: B as u64, image: Some([3, SIDE, SIDE]), ..Default::default() };
    let (x, y, g) = inputs();
    let idx = Tensor::arange(B, (Kind::Int64, Device::Cpu));
    let mut rows = Vec::new();
    for (blocks, reps) in [(4i64, 20u32), (8, 10), (16, 6)] {
        let mut t = instantiate(&plugin, "mixup.comixup", json!({"block_num": blocks, "part": 20, "clean_lam": 0.0}));
        t.setup(&info).expect("setup");
        let mut rng = SplitMix(7);
        let mut grad = |_: f64, _: bool, _: bool| Ok(g.shallow_clone());
        // Σ_k (k + 1)·t_k² over the batch's targets in row-major order: the reference, drawing
        // the same numbers, must reach the same.
        let weights = Tensor::arange(B * CLASSES, (Kind::Double, Device::Cpu)).reshape([B, CLASSES]) + 1.0;
        let mut once = |rng: &mut SplitMix| {
            let (_, target) = t
                .transform_with(&x, &y, None, None, &idx, CLASSES, &mut || rng.next_u64(), Some(&mut grad))
                .expect("transform");
            f64::try_from((target.square() * &weights).sum(Kind::Double)).expect("a number")
        };
        let checksum = once(&mut rng);
        let start = Instant::now();
        for _ in 0..reps {
            once(&mut rng);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(reps);
        println!("block_num {blocks:>2}: {ms:8.1} ms per batch of {B}");
        rows.push(json!({"block_num": blocks, "part": 20, "batch": B, "side": SIDE, "xlab_ms": ms, "reps": reps,
                         "checksum": checksum}));
    }
    if let Ok(path) = std::env::var("XLAB_BENCH_JSON") {
        std::fs::write(path, serde_json::to_vec_pretty(&rows).unwrap()).expect("bench json");
    }
}
