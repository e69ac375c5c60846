//! Sample quality: distances between a set of samples and held-out data, and a picture of
//! image samples.

use crate::Failure;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Kind, Tensor};
use xlab_proto::FailureCause;

/// The sliced Wasserstein-2 distance between the rows of `a` `[n, D]` and `b` `[m, D]`:
/// √(mean over `projections` random unit directions θ of W₂²(θ·a, θ·b)), each 1-D W₂² by
/// matching the quantiles (j + ½)/max(n, m) of the two sorted projections. The directions are
/// drawn from `seed`, so every job's figure uses the same ones.
pub fn sliced_wasserstein(a: &Tensor, b: &Tensor, projections: i64, seed: u64) -> Result<f64, Failure> {
    let dim = a.size()[1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let theta: Vec<f64> = (0..dim * projections).map(|_| crate::data::normal(&mut rng)).collect();
    let theta = Tensor::from_slice(&theta).reshape([dim, projections]).to_device(a.device());
    let theta = &theta / theta.norm_scalaropt_dim(2, [0i64].as_slice(), true);
    let pa = a.to_kind(Kind::Double).matmul(&theta).sort(0, false).0;
    let pb = b.to_kind(Kind::Double).matmul(&theta).sort(0, false).0;
    let (n, m) = (pa.size()[0], pb.size()[0]);
    let q = n.max(m);
    let at = |len: i64| {
        let idx: Vec<i64> = (0..q).map(|j| (((j as f64 + 0.5) / q as f64) * len as f64) as i64).collect();
        Tensor::from_slice(&idx).to_device(a.device())
    };
    let w2 = (pa.index_select(0, &at(n)) - pb.index_select(0, &at(m))).square().mean(Kind::Double);
    Ok(f64::try_from(w2)?.sqrt())
}

/// Entries of a distance block computed at once: 4 Mi float64 values (32 MiB).
const BLOCK: i64 = 1 << 22;

/// (start, length) ranges over `rows` rows such that a block of them against `cols` columns
/// holds at most `BLOCK` entries (at least one row).
fn row_chunks(rows: i64, cols: i64) -> impl Iterator<Item = (i64, i64)> {
    let step = (BLOCK / cols.max(1)).max(1);
    (0..rows).step_by(step as usize).map(move |s| (s, step.min(rows - s)))
}

/// `f` over chunks of 1,024 rows of `x`, the results concatenated along rows: a network's
/// forward pass over many samples without holding every activation at once.
pub fn in_chunks(x: &Tensor, mut f: impl FnMut(&Tensor) -> Tensor) -> Tensor {
    let n = x.size()[0];
    let pieces: Vec<Tensor> = (0..n).step_by(1024).map(|s| f(&x.narrow(0, s, 1024.min(n - s)))).collect();
    Tensor::cat(&pieces, 0)
}

/// Rows in float64 with their squared norms, for distances to many blocks of other rows
/// without recomputing (or copying) them.
pub struct Rows {
    x: Tensor,
    norms: Tensor,
}

impl Rows {
    pub fn new(x: &Tensor) -> Rows {
        let x = x.to_kind(Kind::Double);
        let norms = x.square().sum_dim_intlist(1, false, Kind::Double);
        Rows { x, norms }
    }

    fn len(&self) -> i64 {
        self.x.size()[0]
    }

    fn narrow(&self, start: i64, len: i64) -> Rows {
        Rows { x: self.x.narrow(0, start, len), norms: self.norms.narrow(0, start, len) }
    }

    /// ‖aᵢ − bⱼ‖² for every row pair `[n, m]`, from ‖a‖² + ‖b‖² − 2a·bᵀ (clamped at 0).
    fn squared_distances(&self, b: &Rows) -> Tensor {
        (self.norms.unsqueeze(1) + b.norms.unsqueeze(0) - self.x.matmul(&b.x.tr()) * 2.0).clamp_min(0.0)
    }
}

/// ‖aᵢ − bⱼ‖² for every row pair `[n, m]` in float64 (clamped at 0).
pub fn squared_distances(a: &Tensor, b: &Tensor) -> Tensor {
    Rows::new(a).squared_distances(&Rows::new(b))
}

/// The distance from each row of `a` to its nearest row of `b` `[n]`, a block of rows at a
/// time (memory: one block, whatever the sizes).
pub fn nearest_distance(a: &Tensor, b: &Tensor) -> Tensor {
    let (a, b) = (Rows::new(a), Rows::new(b));
    let pieces: Vec<Tensor> = row_chunks(a.len(), b.len())
        .map(|(s, len)| a.narrow(s, len).squared_distances(&b).amin(1, false).sqrt())
        .collect();
    Tensor::cat(&pieces, 0)
}

/// The mean of exp(−‖aᵢ − bⱼ‖²/(2h²)) over all row pairs, a block of rows at a time.
fn kernel_mean(a: &Rows, b: &Rows, h2: f64) -> Result<f64, Failure> {
    let mut sum = 0.0;
    for (s, len) in row_chunks(a.len(), b.len()) {
        let d2 = a.narrow(s, len).squared_distances(b);
        sum += f64::try_from((d2 / (-2.0 * h2)).exp().sum(Kind::Double))?;
    }
    Ok(sum / (a.len() * b.len()) as f64)
}

/// The held-out rows the MMD bandwidth is taken from: the first 2,000.
const BANDWIDTH_ROWS: i64 = 2000;

/// The rows of each set the MMD compares: the first 10,000 (its cost grows with the square).
pub const MMD_ROWS: i64 = 10_000;

/// The maximum mean discrepancy between the rows of `a` and `b` (the first 10,000 of each)
/// with a Gaussian kernel k(x, y) = exp(−‖x − y‖²/(2h²)), h the median distance between rows
/// of `b` (the held-out data; its first 2,000 rows): √max(0, mean k(a, a) + mean k(b, b) −
/// 2 mean k(a, b)), the biased estimate. The kernel sums go a block of rows at a time.
pub fn mmd_rbf(a: &Tensor, b: &Tensor) -> Result<f64, Failure> {
    let head = |x: &Tensor, rows: i64| x.narrow(0, 0, x.size()[0].min(rows));
    let (a, b) = (Rows::new(&head(a, MMD_ROWS)), Rows::new(&head(b, MMD_ROWS)));
    let bw = b.narrow(0, b.len().min(BANDWIDTH_ROWS));
    let m = bw.len();
    let off = Tensor::ones([m, m], (Kind::Bool, b.x.device())).triu(1);
    let h2 = f64::try_from(bw.squared_distances(&bw).masked_select(&off).sqrt().median())?.powi(2).max(1e-12);
    let v = kernel_mean(&a, &a, h2)? + kernel_mean(&b, &b, h2)? - 2.0 * kernel_mean(&a, &b, h2)?;
    Ok(v.max(0.0).sqrt())
}

/// The mean `[D]` and covariance `[D, D]` (with n − 1) of the rows of `x`, summed a block of
/// rows at a time around a first estimate of the mean (no centred copy of `x`).
fn moments(x: &Tensor) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let d = x.size()[1];
    let mean = x.mean_dim(0, false, Kind::Double);
    let mut scatter = Tensor::zeros([d, d], (Kind::Double, x.device()));
    for (s, len) in row_chunks(n, d) {
        let c = x.narrow(0, s, len).to_kind(Kind::Double) - &mean;
        scatter += c.tr().matmul(&c);
    }
    (mean, scatter / (n - 1).max(1) as f64)
}

/// The Fréchet distance between Gaussians fitted to the rows of `a` and of `b` (as FID does in
/// Inception features): ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a^½ Σ_b Σ_a^½)^½), covariances with
/// n − 1, square roots by symmetric eigendecomposition (negative round-off eigenvalues as 0).
pub fn frechet(a: &Tensor, b: &Tensor) -> Result<f64, Failure> {
    let ((mean_a, ca), (mean_b, cb)) = (moments(a), moments(b));
    let (vals, vecs) = ca.linalg_eigh("L");
    let root = vecs.matmul(&vals.clamp_min(0.0).sqrt().diag_embed(0, -2, -1)).matmul(&vecs.tr());
    let inner = root.matmul(&cb).matmul(&root);
    let inner = (&inner + inner.tr()) / 2.0;
    let (lam, _) = inner.linalg_eigh("L");
    let tr_sqrt = f64::try_from(lam.clamp_min(0.0).sqrt().sum(Kind::Double))?;
    let gap = f64::try_from((mean_a - mean_b).square().sum(Kind::Double))?;
    let traces = f64::try_from(ca.trace() + cb.trace())?;
    Ok((gap + traces - 2.0 * tr_sqrt).max(0.0))
}

/// Digits 0–9 in a 3×5 pixel font, one 3-bit row each (most significant bit on the left).
const GLYPHS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

/// The pixel size of a glyph's dot in the label strip.
const DOT: i64 = 2;

/// Writes up to `cols`² samples (rows of `x` in [-1, 1], each a (channels, height, width) image)
/// as a grid PNG, row by row: sample i at row i / `cols`, column i mod `cols`, 2 pixels apart,
/// small images enlarged to at least 32 pixels a side. With `classes`, the label asked for
/// (i mod `classes`) is written in white under each tile.
pub fn write_grid_png(
    path: &Path,
    x: &Tensor,
    [c, h, w]: [i64; 3],
    cols: i64,
    classes: Option<i64>,
) -> Result<(), Failure> {
    let count = x.size()[0].min(cols * cols);
    let rows = (count + cols - 1) / cols;
    let zoom = (32 / h.max(w)).max(1);
    let gap = 2;
    let strip = if classes.is_some() { 5 * DOT + 2 } else { 0 };
    let (th, tw) = (h * zoom, w * zoom);
    let (width, height) = (cols * (tw + gap) + gap, rows * (th + strip + gap) + gap);
    let pixels = ((x.narrow(0, 0, count).to_kind(Kind::Double) + 1.0) * 127.5).clamp(0.0, 255.0).round();
    let pixels = Vec::<f64>::try_from(pixels.reshape([-1]))?;
    let channels = if c == 3 { 3 } else { 1 };
    let mut buf = vec![0u8; (width * height * channels) as usize];
    let mut put = |px: i64, py: i64, ch: i64, v: u8| buf[((py * width + px) * channels + ch) as usize] = v;
    for i in 0..count {
        let (gy, gx) = (gap + (i / cols) * (th + strip + gap), gap + (i % cols) * (tw + gap));
        for y in 0..th {
            for xx in 0..tw {
                for ch in 0..channels {
                    let src = i * c * h * w + ch.min(c - 1) * h * w + (y / zoom) * w + xx / zoom;
                    put(gx + xx, gy + y, ch, pixels[src as usize] as u8);
                }
            }
        }
        if let Some(k) = classes {
            let text = (i % k).to_string();
            for (j, d) in text.bytes().enumerate() {
                let glyph = GLYPHS[usize::from(d - b'0')];
                let left = gx + j as i64 * 4 * DOT;
                for (r, bits) in glyph.iter().enumerate() {
                    for col in 0..3 {
                        if bits >> (2 - col) & 1 == 1 {
                            for (dy, dx) in (0..DOT).flat_map(|dy| (0..DOT).map(move |dx| (dy, dx))) {
                                let (px, py) = (left + col * DOT + dx, gy + th + 2 + r as i64 * DOT + dy);
                                if px < gx + tw {
                                    (0..channels).for_each(|ch| put(px, py, ch, 255));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let fail = |e: String| Failure::new(FailureCause::Error, format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| fail(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(if channels == 3 { png::ColorType::Rgb } else { png::ColorType::Grayscale });
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
    writer.write_image_data(&buf).map_err(|e| fail(e.to_string()))?;
    writer.finish().map_err(|e| fail(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[f64], d: i64) -> Tensor {
        Tensor::from_slice(v).reshape([-1, d])
    }

    #[test]
    fn sliced_wasserstein_of_a_shift_is_the_shift_along_the_directions() {
        // In 1-D every direction is ±1, so SW₂ is W₂ itself: a shift by 0.5 gives 0.5.
        let a = rows(&[0.0, 1.0, 2.0, 3.0], 1);
        let b = rows(&[0.5, 1.5, 2.5, 3.5], 1);
        assert!((sliced_wasserstein(&a, &b, 16, 0).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(sliced_wasserstein(&a, &a, 16, 0).unwrap(), 0.0);
        // Unequal sizes match quantiles: {0, 1} against {0, 0, 1, 1} is 0.
        let c = rows(&[0.0, 0.0, 1.0, 1.0], 1);
        assert!(sliced_wasserstein(&rows(&[0.0, 1.0], 1), &c, 4, 0).unwrap().abs() < 1e-12);
    }

    #[test]
    fn mmd_is_zero_for_the_same_set_and_grows_with_distance() {
        let b = rows(&[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2);
        assert!(mmd_rbf(&b, &b).unwrap() < 1e-7);
        let near = mmd_rbf(&(&b + 0.1), &b).unwrap();
        let far = mmd_rbf(&(&b + 1.0), &b).unwrap();
        assert!(0.0 < near && near < far, "{near} {far}");
        // By hand for one point each at distance 1 with h = 1 (b's rows 1 apart): 2 − 2e^{−1/2}.
        let one = mmd_rbf(&rows(&[1.0], 1), &rows(&[0.0, 1.0], 1)).unwrap();
        let want = (1.0 + (1.0 + (-0.5f64).exp()) / 2.0 - 2.0 * (1.0 + (-0.5f64).exp()) / 2.0).sqrt();
        assert!((one - want).abs() < 1e-12, "{one} {want}");
    }

    #[test]
    fn blocks_cover_every_row_once_and_distances_match_the_direct_ones() {
        let ranges: Vec<(i64, i64)> = row_chunks(10, BLOCK / 3).collect();
        assert_eq!(ranges, vec![(0, 3), (3, 3), (6, 3), (9, 1)]);
        assert_eq!(row_chunks(5, 2 * BLOCK).count(), 5, "one row at a time when a row alone is too wide");
        let a = rows(&[0.0, 0.0, 3.0, 4.0, 1.0, 1.0], 2);
        let b = rows(&[0.0, 1.0, 3.0, 3.0], 2);
        let got = Vec::<f64>::try_from(nearest_distance(&a, &b)).unwrap();
        let want = [1.0, 1.0, 1.0];
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{got:?}");
        let chunked = in_chunks(&Tensor::arange(2500, (Kind::Double, tch::Device::Cpu)), |x| x * 2.0);
        assert_eq!(f64::try_from(chunked.sum(Kind::Double)).unwrap(), 2499.0 * 2500.0);
    }

    #[test]
    fn frechet_distance_by_hand() {
        let a = rows(&[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.2], 2);
        assert!(frechet(&a, &a).unwrap() < 1e-9);
        // A shift by c moves only the means: the distance is ‖c‖².
        let shifted = &a + Tensor::from_slice(&[3.0f64, -4.0]);
        assert!((frechet(&a, &shifted).unwrap() - 25.0).abs() < 1e-9);
        // 1-D: (μa − μb)² + (σa − σb)². {0, 2}: μ 1, σ² 2; {0, 4}: μ 2, σ² 8.
        let fd = frechet(&rows(&[0.0, 2.0], 1), &rows(&[0.0, 4.0], 1)).unwrap();
        assert!((fd - (1.0 + (2f64.sqrt() - 8f64.sqrt()).powi(2))).abs() < 1e-9, "{fd}");
    }

    #[test]
    fn grid_png_decodes_to_the_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        // Two 2×2 images: black, then white.
        let x = rows(&[-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0], 4);
        write_grid_png(&path, &x, [1, 2, 2], 2, None).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        // zoom 16: tiles of 32 px, 2 px gaps: 2·34 + 2 wide, one row 36 high.
        assert_eq!((info.width, info.height), (70, 36));
        let at = |x: usize, y: usize| buf[y * info.line_size + x];
        assert_eq!(at(2, 2), 0);
        assert_eq!(at(36, 2), 255);
        assert_eq!(at(35, 2), 0, "the gap between tiles");
    }

    #[test]
    fn grid_png_writes_each_label_under_its_tile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        // Three black 2×2 images, labels 0, 1, 0 (two classes), two tiles a row.
        let x = Tensor::full([3, 4], -1.0, (Kind::Double, tch::Device::Cpu));
        write_grid_png(&path, &x, [1, 2, 2], 2, Some(2)).unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        // Rows of 32 px tiles, a 12 px label strip and a 2 px gap.
        assert_eq!((info.width, info.height), (70, 2 + 2 * (32 + 12 + 2)));
        let at = |x: usize, y: usize| buf[y * info.line_size + x];
        // The glyphs start 2 px under a tile, dots of 2 px: "0" has a hollow middle column,
        // "1" a filled one.
        let (zero, one) = (2, 36);
        let mid = |left: usize| (0..5).map(|r| at(left + 2, 36 + r * 2)).collect::<Vec<_>>();
        assert_eq!(mid(zero), vec![255, 0, 0, 0, 255]);
        assert_eq!(mid(one), vec![255, 255, 255, 255, 255]);
        assert_eq!(at(zero, 36 + 4), 255, "the zero's left side");
        assert_eq!(at(2, 2), 0, "the image itself stays black");
    }
}
