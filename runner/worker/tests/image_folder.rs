//! `data: {name: image_folder}` on folders of generated PNG and JPEG files (written by PIL, in
//! the project's Python): the pixels are PIL's `convert` + `resize(BILINEAR)` to within one level
//! for PNG (JPEG decoders differ by a few levels), the splits follow the folder's layout, and a
//! corrupt image, an empty class folder or a stray class is refused with the file or folder named.

use std::path::{Path, PathBuf};
use std::process::Command;
use xlab_plan::config::{DataConfig, FileRef, ImageFolder};

fn python() -> PathBuf {
    match std::env::var_os("XLAB_PYTHON") {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    }
}

/// Writes `root/{train,test}/{cat,dog,emu}/` with PNG (RGB, grey, RGBA, palette) and JPEG (RGB,
/// grey) files of sizes from 9 to 40 pixels; each class has its own colour cast.
const MAKE: &str = r#"
import os, sys
import numpy as np
from PIL import Image
root, per_train, per_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
kinds = ["png_rgb", "jpg_rgb", "png_grey", "png_rgba", "jpg_grey", "png_palette"]
n = 0
for split, per in [("train", per_train), ("test", per_test)]:
    for k, cls in enumerate(["cat", "dog", "emu"]):
        d = os.path.join(root, split, cls)
        os.makedirs(d)
        for i in range(per):
            kind = kinds[n % len(kinds)]
            n += 1
            h, w = (int(v) for v in rng.integers(9, 41, 2))
            px = rng.integers(0, 120, (h, w, 3)).astype(np.int64)
            px[:, :, k] += 120
            px = px.astype(np.uint8)
            im = Image.fromarray(px, "RGB")
            stem = os.path.join(d, f"{i:03d}")
            if kind == "png_rgb":
                im.save(stem + ".png")
            elif kind == "jpg_rgb":
                im.save(stem + ".jpg", quality=90)
            elif kind == "png_grey":
                im.convert("L").save(stem + ".PNG")
            elif kind == "png_rgba":
                a = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
                rgba = im.copy()
                rgba.putalpha(a)
                rgba.save(stem + ".png")
            elif kind == "jpg_grey":
                im.convert("L").save(stem + ".jpeg", quality=90)
            else:
                im.convert("P", palette=Image.ADAPTIVE, colors=16).save(stem + ".png")
        with open(os.path.join(d, "notes.txt"), "w") as f:
            f.write("not an image\n")
"#;

/// What PIL makes of each file: `convert(mode).resize((w, h), BILINEAR)`, channel-major, files
/// in the order given.
const REFERENCE: &str = r#"
import sys
import numpy as np
from PIL import Image
mode, h, w, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = [l.rstrip("\n") for l in sys.stdin]
with open(out, "wb") as f:
    for p in files:
        a = np.asarray(Image.open(p).convert(mode).resize((w, h), Image.BILINEAR))
        a = a[:, :, None] if a.ndim == 2 else a
        f.write(np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes())
"#;

fn run_python(script: &str, args: &[&str], stdin: Option<String>) {
    use std::io::Write;
    let mut c = Command::new(python());
    c.arg("-c").arg(script).args(args).stdin(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", python().display()));
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "python failed");
}

fn folder(per_train: usize, per_test: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    run_python(MAKE, &[root.to_str().unwrap(), &per_train.to_string(), &per_test.to_string()], None);
    dir
}

fn config(root: &Path, size: [usize; 2], n_val: usize, channels: usize) -> DataConfig {
    DataConfig::ImageFolder(ImageFolder {
        path: FileRef { path: root.display().to_string(), sha256: None },
        size,
        n_val,
        normalize: false,
        channels,
        stream: false,
    })
}

fn images_of(split: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for cls in ["cat", "dog", "emu"] {
        let mut f: Vec<PathBuf> = std::fs::read_dir(split.join(cls))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.to_string_lossy().ends_with(".txt"))
            .collect();
        f.sort();
        out.extend(f);
    }
    out
}

#[test]
fn pixels_are_pils_within_a_level_for_png_and_a_few_for_jpeg() {
    let dir = folder(6, 2);
    let files = images_of(&dir.path().join("imgs/train"));
    assert_eq!(files.len(), 18);
    for (mode, channels, size) in [("RGB", 3, [12, 20]), ("L", 1, [24, 9])] {
        let got = xlab_worker::images::load(&files, size, channels, 2).unwrap();
        let reference = dir.path().join(format!("ref-{mode}.bin"));
        let list: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
        run_python(
            REFERENCE,
            &[mode, &size[0].to_string(), &size[1].to_string(), reference.to_str().unwrap()],
            Some(list),
        );
        let want = std::fs::read(&reference).unwrap();
        assert_eq!(got.len(), want.len());
        let per = channels * size[0] * size[1];
        let mut worst_png_jpeg = [0i16; 2];
        for (k, f) in files.iter().enumerate() {
            let (a, b) = (&got[k * per..(k + 1) * per], &want[k * per..(k + 1) * per]);
            let jpeg = f.extension().is_some_and(|e| e.to_string_lossy().to_lowercase().starts_with("jp"));
            let worst = a.iter().zip(b).map(|(x, y)| (i16::from(*x) - i16::from(*y)).abs()).max().unwrap();
            let mean = a.iter().zip(b).map(|(x, y)| f64::from((i16::from(*x) - i16::from(*y)).abs())).sum::<f64>()
                / per as f64;
            if jpeg {
                // Two JPEG decoders (PIL's libjpeg-turbo, and jpeg-decoder) round their inverse
                // DCT and chroma upsampling differently.
                assert!(worst <= 3 && mean <= 1.0, "{} ({mode}): max diff {worst}, mean {mean:.2}", f.display());
            } else {
                // The same filter and integer arithmetic as PIL; PIL 13 sometimes takes the
                // vertical pass first, which rounds the intermediate rows differently.
                assert!(worst <= 1 && mean <= 0.5, "{} ({mode}): max diff {worst}, mean {mean:.2}", f.display());
            }
            worst_png_jpeg[usize::from(jpeg)] = worst_png_jpeg[usize::from(jpeg)].max(worst);
        }
        eprintln!("{mode}: largest difference from PIL {} (PNG), {} (JPEG)", worst_png_jpeg[0], worst_png_jpeg[1]);
    }
}

#[test]
fn splits_follow_the_folders_layout() {
    let dir = folder(6, 2);
    let root = dir.path().join("imgs");
    // train + test, validation drawn from train.
    let d = xlab_worker::data::build(&config(&root, [8, 8], 5, 3)).unwrap();
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (13, 5, 6));
    assert_eq!((d.classes, d.input_dim, d.image), (3, 192, Some([3, 8, 8])));
    let labels = |t: &tch::Tensor| Vec::<i64>::try_from(t).unwrap();
    let mut all: Vec<i64> = labels(&d.train.y).into_iter().chain(labels(&d.val.y)).collect();
    all.sort();
    assert_eq!(all, [vec![0; 6], vec![1; 6], vec![2; 6]].concat(), "every training image once");
    assert_eq!(labels(&d.test.y), vec![0, 0, 1, 1, 2, 2]);
    let again = xlab_worker::data::build(&config(&root, [8, 8], 5, 3)).unwrap();
    assert!(again.val.x.equal(&d.val.x), "the validation draw is fixed");
    // A `val` folder is the validation split.
    std::fs::create_dir_all(root.join("val/dog")).unwrap();
    std::fs::copy(&images_of(&root.join("test"))[2], root.join("val/dog/a.png")).unwrap();
    let d = xlab_worker::data::build(&config(&root, [8, 8], 0, 1)).unwrap();
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (18, 1, 6));
    assert_eq!(labels(&d.val.y), vec![1]);
    let e = xlab_worker::data::build(&config(&root, [8, 8], 2, 1)).err().unwrap();
    assert!(e.contains("has a `val` folder") && e.contains("drop n_val"), "{e}");
    // train + val only (ImageNet's layout): `val` is what results are reported on.
    std::fs::remove_dir_all(root.join("test")).unwrap();
    let d = xlab_worker::data::build(&config(&root, [8, 8], 0, 3)).unwrap();
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (18, 0, 1));
}

#[test]
fn a_corrupt_image_an_empty_class_and_a_stray_class_are_refused_by_name() {
    let dir = folder(3, 1);
    let root = dir.path().join("imgs");
    let build = || xlab_worker::data::build(&config(&root, [8, 8], 0, 3)).err().unwrap_or_default();
    let good = std::fs::read(root.join("train/dog/000.png")).unwrap();
    assert!(good.starts_with(b"\x89PNG"));
    std::fs::write(root.join("train/dog/001.png"), &good[..good.len() / 2]).unwrap();
    let e = build();
    assert!(e.contains("train/dog/001.png") && e.contains("not a valid PNG"), "{e}");
    std::fs::write(root.join("train/dog/001.png"), b"GIF89a not really").unwrap();
    let e = build();
    assert!(e.contains("train/dog/001.png: neither a PNG nor a JPEG"), "{e}");
    std::fs::write(root.join("train/dog/001.png"), &good).unwrap();
    std::fs::create_dir_all(root.join("train/fox")).unwrap();
    std::fs::write(root.join("train/fox/readme.txt"), b"soon").unwrap();
    let e = build();
    assert!(e.contains("train/fox holds no PNG or JPEG files"), "{e}");
    std::fs::remove_dir_all(root.join("train/fox")).unwrap();
    std::fs::create_dir_all(root.join("test/yak")).unwrap();
    let e = build();
    assert!(e.contains("has a class folder `yak`"), "{e}");
    std::fs::remove_dir_all(root.join("test/yak")).unwrap();
    assert!(xlab_worker::data::build(&config(&root, [8, 8], 0, 3)).is_ok());
    std::fs::remove_dir_all(root.join("test")).unwrap();
    let e = build();
    assert!(e.contains("no `test` (or `val`) folder"), "{e}");
}

/// Streamed (`stream: true`), the training rows come batch by batch, decoded ahead on threads,
/// and equal the rows of the folder decoded into memory, normalized with the same statistics;
/// a batch from the middle of an epoch (a resume) too.
#[test]
fn streamed_batches_equal_the_rows_in_memory() {
    let dir = folder(7, 2);
    let root = dir.path().join("imgs");
    let DataConfig::ImageFolder(mut c) = config(&root, [10, 6], 4, 3) else { unreachable!() };
    c.normalize = true;
    let memory = xlab_worker::data::build(&DataConfig::ImageFolder(c.clone())).unwrap();
    c.stream = true;
    let cfg = DataConfig::ImageFolder(c);
    // Other tasks read the folder into memory.
    assert!(xlab_worker::data::build_for(xlab_plan::config::Task::Evaluate, &cfg).unwrap().train_stream.is_none());
    let streamed = xlab_worker::data::build_for(xlab_plan::config::Task::Train, &cfg).unwrap();
    let stream = streamed.train_stream.clone().expect("streamed");
    assert_eq!(streamed.train.x.size(), [0, 180], "nothing of the training split in memory");
    assert_eq!((stream.len(), streamed.train.len()), (17, 17));
    assert!(streamed.train.y.equal(&memory.train.y));
    assert!(streamed.val.x.equal(&memory.val.x) && streamed.test.x.equal(&memory.test.x));
    let order: Vec<i64> = (0..17).rev().collect();
    for from in [0, 2] {
        let mut ahead = stream.batches(&order, 4, from);
        for chunk in order.chunks(4).skip(from) {
            let want = memory.train.x.index_select(0, &tch::Tensor::from_slice(chunk));
            assert!(ahead.next_batch().unwrap().equal(&want), "batch of {chunk:?}");
        }
    }
    assert!(stream.rows(&[3, 0]).unwrap().equal(&memory.train.x.index_select(0, &tch::Tensor::from_slice(&[3i64, 0]))));
}
