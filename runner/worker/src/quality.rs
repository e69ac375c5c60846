//! Sample quality: distances between a set of samples and held-out data, and a picture of
//! image samples.

use crate::train::Failure;
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

/// The maximum mean discrepancy between the rows of `a` and `b` with a Gaussian kernel
/// k(x, y) = exp(−‖x − y‖²/(2h²)), h the median distance between rows of `b` (the held-out
/// data): √max(0, mean k(a, a) + mean k(b, b) − 2 mean k(a, b)), the biased estimate.
pub fn mmd_rbf(a: &Tensor, b: &Tensor) -> Result<f64, Failure> {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let d2 = |x: &Tensor, y: &Tensor| {
        (x.square().sum_dim_intlist(1, true, Kind::Double) + y.square().sum_dim_intlist(1, true, Kind::Double).t_()
            - x.matmul(&y.t_copy()) * 2.0)
            .clamp_min(0.0)
    };
    let dbb = d2(&b, &b);
    let m = b.size()[0];
    let off = Tensor::ones([m, m], (Kind::Bool, b.device())).triu(1);
    let h2 = f64::try_from(dbb.masked_select(&off).sqrt().median())?.powi(2).max(1e-12);
    let k = |d: Tensor| (d / (-2.0 * h2)).exp().mean(Kind::Double);
    let v = f64::try_from(k(d2(&a, &a)) + k(dbb) - k(d2(&a, &b)) * 2.0)?;
    Ok(v.max(0.0).sqrt())
}

/// The Fréchet distance between Gaussians fitted to the rows of `a` and of `b` (as FID does in
/// Inception features): ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a^½ Σ_b Σ_a^½)^½), covariances with
/// n − 1, square roots by symmetric eigendecomposition (negative round-off eigenvalues as 0).
pub fn frechet(a: &Tensor, b: &Tensor) -> Result<f64, Failure> {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let cov = |x: &Tensor| {
        let c = x - x.mean_dim(0, true, Kind::Double);
        c.t_copy().matmul(&c) / (x.size()[0] - 1).max(1) as f64
    };
    let (ca, cb) = (cov(&a), cov(&b));
    let (vals, vecs) = ca.linalg_eigh("L");
    let root = vecs.matmul(&vals.clamp_min(0.0).sqrt().diag_embed(0, -2, -1)).matmul(&vecs.t_copy());
    let inner = root.matmul(&cb).matmul(&root);
    let inner = (&inner + inner.t_copy()) / 2.0;
    let (lam, _) = inner.linalg_eigh("L");
    let tr_sqrt = f64::try_from(lam.clamp_min(0.0).sqrt().sum(Kind::Double))?;
    let gap = f64::try_from(
        (a.mean_dim(0, false, Kind::Double) - b.mean_dim(0, false, Kind::Double)).square().sum(Kind::Double),
    )?;
    let traces = f64::try_from(ca.trace() + cb.trace())?;
    Ok((gap + traces - 2.0 * tr_sqrt).max(0.0))
}

/// Writes up to `cols`² samples (rows of `x` in [-1, 1], each a (channels, height, width) image)
/// as a grid PNG: `cols` images a row, 2 pixels apart, small images enlarged to at least 32
/// pixels a side.
pub fn write_grid_png(path: &Path, x: &Tensor, [c, h, w]: [i64; 3], cols: i64) -> Result<(), Failure> {
    let count = x.size()[0].min(cols * cols);
    let rows = (count + cols - 1) / cols;
    let zoom = (32 / h.max(w)).max(1);
    let (th, tw, gap) = (h * zoom, w * zoom, 2);
    let (width, height) = (cols * (tw + gap) + gap, rows * (th + gap) + gap);
    let pixels = ((x.narrow(0, 0, count).to_kind(Kind::Double) + 1.0) * 127.5).clamp(0.0, 255.0).round();
    let pixels = Vec::<f64>::try_from(pixels.reshape([-1]))?;
    let channels = if c == 3 { 3 } else { 1 };
    let mut buf = vec![0u8; (width * height * channels) as usize];
    for i in 0..count {
        let (gy, gx) = (gap + (i / cols) * (th + gap), gap + (i % cols) * (tw + gap));
        for y in 0..th {
            for xx in 0..tw {
                for ch in 0..channels {
                    let src = i * c * h * w + ch.min(c - 1) * h * w + (y / zoom) * w + xx / zoom;
                    let dst = ((gy + y) * width + gx + xx) * channels + ch;
                    buf[dst as usize] = pixels[src as usize] as u8;
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
        write_grid_png(&path, &x, [1, 2, 2], 2).unwrap();
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
}
