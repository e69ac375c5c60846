//! `data: {name: image_folder}`: a folder of PNG and JPEG files in the layout torchvision's
//! `ImageFolder` reads (`train/<class>/*.png`, …), decoded on the job's threads, converted to
//! RGB or grey and resized as PIL does (antialiased bilinear), then split as the built-in image
//! sets are. The folder is decoded into memory when the job starts.

use crate::data::{Dataset, Split};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tch::{Kind, Tensor};
use xlab_plan::config::ImageFolder;

/// The image files of one split: (file, class index), classes in sorted order, files sorted
/// within each class.
fn listing(split: &Path, classes: &[String]) -> Result<Vec<(PathBuf, i64)>, String> {
    let mut out = Vec::new();
    for (k, class) in classes.iter().enumerate() {
        let dir = split.join(class);
        if !dir.is_dir() {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image_name(p))
            .collect();
        if files.is_empty() {
            return Err(format!(
                "{} holds no PNG or JPEG files: a class folder needs at least one image (remove the folder, or add its images)",
                dir.display()
            ));
        }
        files.sort();
        out.extend(files.into_iter().map(|f| (f, k as i64)));
    }
    Ok(out)
}

/// `.png`, `.jpg` or `.jpeg`, in any case, and not hidden: other files (notes, `.DS_Store`) are
/// not images of the set.
fn is_image_name(p: &Path) -> bool {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    !name.starts_with('.') && matches!(ext.as_str(), "png" | "jpg" | "jpeg")
}

/// The class folders of a split, sorted.
fn class_names(split: &Path) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = std::fs::read_dir(split)
        .map_err(|e| format!("cannot read {}: {e}", split.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Pixels as decoded: 8-bit samples, row-major, `channels` per pixel (1 grey, 3 RGB).
struct Decoded {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
}

/// Decodes a PNG or JPEG file (told apart by their first bytes, not their names) to 8-bit grey
/// or RGB; alpha is dropped and 16-bit samples keep their high byte, as PIL's `convert` does.
fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().map_err(|e| format!("not a valid PNG: {e}"))?;
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).map_err(|e| format!("not a valid PNG: {e}"))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let samples = info.color_type.samples();
        buf.truncate(w * h * samples);
        let keep = match info.color_type {
            png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha => 1,
            _ => 3,
        };
        let pixels = if keep == samples { buf } else { buf.chunks(samples).flat_map(|p| p[..keep].to_vec()).collect() };
        return Ok(Decoded { width: w, height: h, channels: keep, pixels });
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        let mut dec = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
        let pixels = dec.decode().map_err(|e| format!("not a valid JPEG: {e}"))?;
        let info = dec.info().ok_or("not a valid JPEG: no frame header")?;
        let (w, h) = (info.width as usize, info.height as usize);
        let (channels, pixels) = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 => (1, pixels),
            jpeg_decoder::PixelFormat::RGB24 => (3, pixels),
            // Big-endian 16-bit grey: the high byte.
            jpeg_decoder::PixelFormat::L16 => (1, pixels.chunks(2).map(|p| p[0]).collect()),
            jpeg_decoder::PixelFormat::CMYK32 => {
                return Err("a CMYK JPEG, which xlab does not convert: save it as RGB".into());
            }
        };
        return Ok(Decoded { width: w, height: h, channels, pixels });
    }
    Err("neither a PNG nor a JPEG file (by its first bytes)".into())
}

/// Converts to `channels` (grey by ITU-R 601-2 luma, as PIL's "L"; grey to RGB by copying).
fn to_channels(d: Decoded, channels: usize) -> Decoded {
    if d.channels == channels {
        return d;
    }
    let pixels = if channels == 1 {
        d.pixels
            .chunks(3)
            .map(|p| {
                ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
            })
            .collect()
    } else {
        d.pixels.iter().flat_map(|&g| [g, g, g]).collect()
    };
    Decoded { channels, pixels, ..d }
}

/// PIL's fixed-point precision for 8-bit resampling: weights are integers scaled by 2^22.
const PRECISION_BITS: u32 = 22;

/// For each output position, the first input position it reads and the weights of those it
/// reads: PIL's bilinear filter (a triangle), widened by the reduction factor when shrinking,
/// which is what makes a reduction antialiased; normalized, then fixed-point as PIL has them.
fn weights(input: usize, output: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = input as f64 / output as f64;
    let widen = scale.max(1.0);
    // PIL multiplies by the inverse (the last bits of a weight decide its fixed-point value).
    let inverse = 1.0 / widen;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - widen + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + widen + 0.5).floor() as usize).min(input);
            let w: Vec<f64> = (lo..hi).map(|x| (1.0 - ((x as f64 - center + 0.5) * inverse).abs()).max(0.0)).collect();
            let sum: f64 = w.iter().sum();
            let fixed = |v: f64| {
                let k = v / sum * f64::from(1u32 << PRECISION_BITS);
                (if k < 0.0 { k - 0.5 } else { k + 0.5 }) as i64
            };
            (lo, w.iter().map(|&v| fixed(v)).collect())
        })
        .collect()
}

/// One output sample from its inputs and fixed-point weights, rounded and clipped to 8 bits.
fn sample(w: &[i64], at: impl Fn(usize) -> u8) -> u8 {
    let acc: i64 =
        (1i64 << (PRECISION_BITS - 1)) + w.iter().enumerate().map(|(k, wk)| wk * i64::from(at(k))).sum::<i64>();
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `[height, width]` as PIL's `Image.resize(…, BILINEAR)` does for 8-bit images (a
/// horizontal pass to 8 bits, then a vertical one, in the same integer arithmetic; PIL 13 takes
/// the vertical pass first for some shapes, which moves a pixel by one level at most), and lays
/// the pixels out channel-major (C×H×W), as the models read them.
fn resize_chw(d: &Decoded, [height, width]: [usize; 2]) -> Vec<u8> {
    let c = d.channels;
    let (wx, wy) = (weights(d.width, width), weights(d.height, height));
    // Rows of the input, columns resized: height × width × c.
    let mut across = vec![0u8; d.height * width * c];
    for y in 0..d.height {
        let row = &d.pixels[y * d.width * c..(y + 1) * d.width * c];
        for (x, (lo, w)) in wx.iter().enumerate() {
            for ch in 0..c {
                across[(y * width + x) * c + ch] = sample(w, |k| row[(lo + k) * c + ch]);
            }
        }
    }
    let mut out = vec![0u8; c * height * width];
    for (y, (lo, w)) in wy.iter().enumerate() {
        for x in 0..width {
            for ch in 0..c {
                out[(ch * height + y) * width + x] = sample(w, |k| across[((lo + k) * width + x) * c + ch]);
            }
        }
    }
    out
}

/// Decodes and resizes every file on `threads` threads; the pixels of each, in order. The
/// first bad file (in order) is the error, naming it.
pub fn load(files: &[PathBuf], size: [usize; 2], channels: usize, threads: usize) -> Result<Vec<u8>, String> {
    let per = channels * size[0] * size[1];
    let mut out = vec![0u8; files.len() * per];
    let next = AtomicUsize::new(0);
    let chunks: Vec<std::sync::Mutex<&mut [u8]>> = out.chunks_mut(per.max(1)).map(std::sync::Mutex::new).collect();
    let errors: std::sync::Mutex<Vec<(usize, String)>> = Default::default();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, files.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= files.len() {
                    break;
                }
                let f = &files[i];
                let done = std::fs::read(f)
                    .map_err(|e| e.to_string())
                    .and_then(|b| decode(&b))
                    .map(|d| resize_chw(&to_channels(d, channels), size));
                match done {
                    Ok(px) => chunks[i].lock().expect("not poisoned").copy_from_slice(&px),
                    Err(e) => errors.lock().expect("not poisoned").push((i, format!("{}: {e}", f.display()))),
                }
            });
        }
    });
    drop(chunks);
    let mut errors = errors.into_inner().expect("not poisoned");
    errors.sort();
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(out),
    }
}

/// The decoding threads: the job's (its `--threads` lease).
fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

/// Normalization statistics come from at most this many training images (drawn once).
const STATS_IMAGES: usize = 10_000;

/// Per-channel mean and standard deviation (population) of pixel values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Norm {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Norm {
    /// From images' bytes (C×H×W each, `plane` = H×W), by exact integer sums: the same numbers
    /// however the images were read.
    fn of<'a>(images: impl Iterator<Item = &'a [u8]>, channels: usize, plane: usize) -> Norm {
        let (mut sum, mut squares, mut count) = (vec![0u64; channels], vec![0u64; channels], vec![0u64; channels]);
        // An image's planes are its channels in turn.
        for image in images {
            for (ch, chunk) in image.chunks(plane.max(1)).enumerate() {
                for &p in chunk {
                    sum[ch] += u64::from(p);
                    squares[ch] += u64::from(p) * u64::from(p);
                }
                count[ch] += chunk.len() as u64;
            }
        }
        let mut mean = Vec::with_capacity(channels);
        let mut std = Vec::with_capacity(channels);
        for ch in 0..channels {
            let n = count[ch].max(1) as f64;
            let m = sum[ch] as f64 / n;
            let var = (squares[ch] as f64 / n - m * m).max(0.0);
            mean.push((m / 255.0) as f32);
            std.push(((var.sqrt() / 255.0) as f32).max(1e-8));
        }
        Norm { mean, std }
    }
}

/// Rows of floats from images' bytes: scaled to [0, 1], then standardized per channel. Each
/// value depends on its own byte only, so a batch's rows equal those of the whole split.
fn to_rows(pixels: &[u8], shape: [i64; 3], norm: Option<&Norm>) -> Tensor {
    let dim = shape.iter().product::<i64>();
    let n = pixels.len() as i64 / dim.max(1);
    let x = Tensor::from_slice(pixels).to_kind(Kind::Float).reshape([n, shape[0], shape[1] * shape[2]]) / 255.0;
    let x = match norm {
        Some(nm) => {
            let mean = Tensor::from_slice(&nm.mean).reshape([1, shape[0], 1]);
            let std = Tensor::from_slice(&nm.std).reshape([1, shape[0], 1]);
            (x - mean) / std
        }
        None => x,
    };
    x.reshape([n, dim])
}

/// The training images of a folder read as training goes (`stream: true`).
pub struct Stream {
    files: Vec<PathBuf>,
    size: [usize; 2],
    channels: usize,
    norm: Option<Norm>,
    threads: usize,
}

impl Stream {
    fn shape(&self) -> [i64; 3] {
        [self.channels as i64, self.size[0] as i64, self.size[1] as i64]
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The rows of these training examples, decoded now (a batch transform that draws its own
    /// examples asks for them).
    pub fn rows(&self, idx: &[i64]) -> Result<Tensor, String> {
        Ok(to_rows(&self.pixels(idx, self.threads)?, self.shape(), self.norm.as_ref()))
    }

    /// The bytes of these training examples, decoded on `threads` threads.
    fn pixels(&self, idx: &[i64], threads: usize) -> Result<Vec<u8>, String> {
        let files: Vec<PathBuf> = idx.iter().map(|&i| self.files[i as usize].clone()).collect();
        load(&files, self.size, self.channels, threads)
    }

    /// An epoch's batches (`order` in batches of `batch`), from batch `from` on, each decoded
    /// ahead of its step on the job's threads; at most a few batches wait decoded at any time.
    pub fn batches(self: &Arc<Self>, order: &[i64], batch: usize, from: usize) -> Prefetch {
        let chunks: Vec<Vec<i64>> = order.chunks(batch.max(1)).map(<[i64]>::to_vec).collect();
        let end = chunks.len();
        let depth = (2 * self.threads).max(4);
        let shared = Arc::new((
            Mutex::new(Ahead { ready: BTreeMap::new(), claimed: from, taken: from, stop: false }),
            Condvar::new(),
        ));
        let chunks = Arc::new(chunks);
        let handles = (0..self.threads.clamp(1, end.saturating_sub(from).max(1)))
            .map(|_| {
                let (shared, chunks, stream) = (Arc::clone(&shared), Arc::clone(&chunks), Arc::clone(self));
                std::thread::spawn(move || decode_ahead(&shared, &chunks, &stream, depth))
            })
            .collect();
        Prefetch { shared, next: from, handles, stream: Arc::clone(self) }
    }
}

struct Ahead {
    ready: BTreeMap<usize, Result<Vec<u8>, String>>,
    /// The next batch a decoding thread takes up.
    claimed: usize,
    /// The next batch the step takes.
    taken: usize,
    stop: bool,
}

type Shared = (Mutex<Ahead>, Condvar);

/// A decoding thread: takes the next batch while fewer than `depth` are ahead of the step.
fn decode_ahead(shared: &Shared, chunks: &[Vec<i64>], stream: &Stream, depth: usize) {
    let (lock, wake) = shared;
    loop {
        let k = {
            let mut a = lock.lock().expect("not poisoned");
            while !a.stop && a.claimed < chunks.len() && a.claimed >= a.taken + depth {
                a = wake.wait(a).expect("not poisoned");
            }
            if a.stop || a.claimed >= chunks.len() {
                return;
            }
            a.claimed += 1;
            a.claimed - 1
        };
        let pixels = stream.pixels(&chunks[k], 1);
        lock.lock().expect("not poisoned").ready.insert(k, pixels);
        wake.notify_all();
    }
}

/// An epoch's batches as they are decoded.
pub struct Prefetch {
    shared: Arc<Shared>,
    next: usize,
    handles: Vec<std::thread::JoinHandle<()>>,
    stream: Arc<Stream>,
}

impl Prefetch {
    /// The next batch's rows, waiting for it if it is not decoded yet.
    pub fn next_batch(&mut self) -> Result<Tensor, String> {
        let (lock, wake) = &*self.shared;
        let pixels = {
            let mut a = lock.lock().expect("not poisoned");
            loop {
                if let Some(p) = a.ready.remove(&self.next) {
                    a.taken = self.next + 1;
                    break p;
                }
                a = wake.wait(a).expect("not poisoned");
            }
        };
        wake.notify_all();
        self.next += 1;
        Ok(to_rows(&pixels?, self.stream.shape(), self.stream.norm.as_ref()))
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().expect("not poisoned").stop = true;
        wake.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The training images that normalization statistics come from: all of them, or a fixed draw
/// of `STATS_IMAGES` (indices into the training list, in order).
fn stats_sample(n: usize) -> Vec<usize> {
    if n <= STATS_IMAGES {
        return (0..n).collect();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(1));
    let mut chosen = order[..STATS_IMAGES].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The folder's splits: training files (then the validation files drawn from `train` or read
/// from `val`), test files, the validation count and the class count.
struct Layout {
    train: Vec<(PathBuf, i64)>,
    val: Vec<(PathBuf, i64)>,
    test: Vec<(PathBuf, i64)>,
    classes: usize,
}

fn layout(c: &ImageFolder) -> Result<Layout, String> {
    let root = Path::new(&c.path.path);
    let train_dir = root.join("train");
    if !train_dir.is_dir() {
        return Err(format!(
            "{} has no `train` folder: image_folder reads train/<class>/*.png|jpg, test/<class>/… and optionally val/<class>/…",
            root.display()
        ));
    }
    let classes = class_names(&train_dir)?;
    if classes.len() < 2 {
        return Err(format!(
            "{} has {} class folder(s); a classifier needs at least 2",
            train_dir.display(),
            classes.len()
        ));
    }
    let (val_dir, test_dir) = (root.join("val"), root.join("test"));
    // train + val only (ImageNet's layout): `val` is the split results are reported on.
    let (val_dir, test_dir) = match (val_dir.is_dir(), test_dir.is_dir()) {
        (_, true) => (val_dir.is_dir().then_some(val_dir), test_dir),
        (true, false) => (None, val_dir),
        (false, false) => {
            return Err(format!("{} has no `test` (or `val`) folder to evaluate on", root.display()));
        }
    };
    for dir in std::iter::once(&test_dir).chain(&val_dir) {
        if let Some(stray) = class_names(dir)?.into_iter().find(|n| !classes.contains(n)) {
            return Err(format!(
                "{} has a class folder `{stray}` that {} lacks: every split uses the training classes",
                dir.display(),
                train_dir.display()
            ));
        }
    }
    let train = listing(&train_dir, &classes)?;
    let test = listing(&test_dir, &classes)?;
    if test.is_empty() {
        return Err(format!("{} holds no images", test_dir.display()));
    }
    // The validation split: the `val` folder's images, or `n_val` training images drawn once
    // (a fixed draw, the same for every job).
    let (train, val) = match &val_dir {
        Some(dir) => {
            if c.n_val > 0 {
                return Err(format!(
                    "n_val = {} asks for validation images from `train`, but {} has a `val` folder, which is the \
                     validation split; drop n_val",
                    c.n_val,
                    root.display()
                ));
            }
            (train, listing(dir, &classes)?)
        }
        None => {
            if c.n_val >= train.len() {
                return Err(format!(
                    "n_val = {} leaves none of the {} training images for training",
                    c.n_val,
                    train.len()
                ));
            }
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(0));
            let chosen: std::collections::HashSet<usize> = order[..c.n_val].iter().copied().collect();
            let (kept, val): (Vec<_>, Vec<_>) = train.into_iter().enumerate().partition(|(i, _)| !chosen.contains(i));
            (kept.into_iter().map(|(_, f)| f).collect(), val.into_iter().map(|(_, f)| f).collect())
        }
    };
    Ok(Layout { train, val, test, classes: classes.len() })
}

/// The folder as a dataset, its training images decoded into memory, or (`stream`) left on
/// disk for training to read batch by batch.
pub fn image_folder(c: &ImageFolder, stream: bool) -> Result<Dataset, String> {
    let Layout { train, val, test, classes } = layout(c)?;
    let threads = threads();
    let shape = [c.channels as i64, c.size[0] as i64, c.size[1] as i64];
    let files = |list: &[(PathBuf, i64)]| list.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>();
    let labels = |list: &[(PathBuf, i64)]| Tensor::from_slice(&list.iter().map(|(_, y)| *y).collect::<Vec<_>>());
    let sample = stats_sample(train.len());
    let per = (shape.iter().product::<i64>()) as usize;
    let plane = c.size[0] * c.size[1];
    let (train_pixels, norm) = if stream {
        let picked: Vec<PathBuf> = sample.iter().map(|&i| train[i].0.clone()).collect();
        let norm = c
            .normalize
            .then(|| load(&picked, c.size, c.channels, threads).map(|p| Norm::of(p.chunks(per), c.channels, plane)));
        (None, norm.transpose()?)
    } else {
        let pixels = load(&files(&train), c.size, c.channels, threads)?;
        let norm =
            c.normalize.then(|| Norm::of(sample.iter().map(|&i| &pixels[i * per..(i + 1) * per]), c.channels, plane));
        (Some(pixels), norm)
    };
    let split = |x: Tensor, list: &[(PathBuf, i64)]| Split { x, y: labels(list), group: None, domain: None };
    let decoded = |list: &[(PathBuf, i64)]| -> Result<Tensor, String> {
        Ok(to_rows(&load(&files(list), c.size, c.channels, threads)?, shape, norm.as_ref()))
    };
    let (train_x, train_stream) = match train_pixels {
        Some(p) => (to_rows(&p, shape, norm.as_ref()), None),
        None => (
            Tensor::zeros([0, per as i64], (Kind::Float, tch::Device::Cpu)),
            Some(Arc::new(Stream {
                files: files(&train),
                size: c.size,
                channels: c.channels,
                norm: norm.clone(),
                threads,
            })),
        ),
    };
    Ok(Dataset {
        train: split(train_x, &train),
        val: split(decoded(&val)?, &val),
        test: split(decoded(&test)?, &test),
        input_dim: per,
        classes,
        groups: 0,
        image: Some(shape),
        standardized: None,
        train_stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_gives_pils_bytes() {
        let d = Decoded { width: 4, height: 2, channels: 1, pixels: vec![0, 100, 200, 255, 10, 20, 30, 40] };
        assert_eq!(resize_chw(&d, [2, 4]), d.pixels, "same size: unchanged");
        // PIL 13's `Image.fromarray(a, "L").resize((w, h), Image.BILINEAR)` gives these bytes.
        assert_eq!(resize_chw(&d, [1, 2]), vec![44, 121]);
        assert_eq!(resize_chw(&d, [2, 3]), vec![30, 150, 239, 13, 25, 37]);
        assert_eq!(
            resize_chw(&d, [3, 7]),
            vec![0, 36, 93, 150, 204, 235, 255, 5, 25, 56, 88, 118, 136, 148, 10, 14, 19, 25, 31, 36, 40]
        );
        // Channel-major: an RGB image's planes come one after another.
        let rgb = Decoded { width: 1, height: 1, channels: 3, pixels: vec![1, 2, 3] };
        assert_eq!(resize_chw(&rgb, [1, 1]), vec![1, 2, 3]);
        assert_eq!(resize_chw(&rgb, [1, 2]), vec![1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn grey_is_pil_luma_and_grey_to_rgb_copies() {
        let d = Decoded { width: 2, height: 1, channels: 3, pixels: vec![255, 0, 0, 10, 200, 30] };
        // PIL 13's `.convert("L")` of these pixels (L = R·299/1000 + G·587/1000 + B·114/1000).
        assert_eq!(to_channels(d, 1).pixels, vec![76, 124]);
        let g = Decoded { width: 1, height: 1, channels: 1, pixels: vec![7] };
        assert_eq!(to_channels(g, 3).pixels, vec![7, 7, 7]);
    }
}
