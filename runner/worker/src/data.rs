//! Datasets. Generators are deterministic in their own seed (ChaCha8 streams, Box–Muller normals),
//! so a dataset is the same on every machine and in every process.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::PathBuf;
use tch::{Kind, Tensor};
use xlab_spec::config::{Blobs, DataConfig, Digits, Npz, Spurious, TwoMoons, DIGITS_TOTAL};

/// Features, labels and (when the data has them) group ids of one split.
pub struct Split {
    pub x: Tensor,
    pub y: Tensor,
    pub group: Option<Tensor>,
    /// Domain ids (the spurious generator's attribute), when the data has domains.
    pub domain: Option<Tensor>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.y.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Dataset {
    pub train: Split,
    pub val: Split,
    pub test: Split,
    pub input_dim: usize,
    pub classes: usize,
    /// Number of groups (0 when the data has none).
    pub groups: usize,
    /// Images: (channels, height, width) of each flattened row of `x`.
    pub image: Option<[i64; 3]>,
}

impl Dataset {
    /// Training-set size of each group.
    pub fn group_counts(&self) -> Vec<u64> {
        match &self.train.group {
            Some(g) => g
                .bincount::<Tensor>(None, self.groups as i64)
                .iter::<i64>()
                .map(|it| it.map(|c| c as u64).collect())
                .unwrap_or_default(),
            None => vec![],
        }
    }
}

/// Standard normal draws by the Box–Muller transform (no dependence on a distribution crate's
/// algorithm choices, so the stream is fixed forever).
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub fn build(cfg: &DataConfig) -> Result<Dataset, String> {
    Ok(match cfg {
        DataConfig::TwoMoons(c) => two_moons(c),
        DataConfig::Blobs(c) => blobs(c),
        DataConfig::Spurious(c) => spurious(c),
        DataConfig::Digits(c) => digits(c)?,
        DataConfig::Npz(c) => npz(c)?,
    })
}

/// Where scikit-learn's `digits.csv.gz` is: `XLAB_DIGITS`, or the scikit-learn installed beside
/// the torch package this process runs (the project's `.venv`).
fn digits_file() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("XLAB_DIGITS") {
        return Ok(PathBuf::from(p));
    }
    let site = crate::probe::libtorch_dir()
        .and_then(|lib| lib.parent()?.parent().map(|d| d.to_path_buf()))
        .ok_or("cannot tell where the torch package is installed")?;
    let file = site.join("sklearn/datasets/data/digits.csv.gz");
    if file.exists() {
        Ok(file)
    } else {
        Err(format!(
            "the digits dataset ships with scikit-learn, and {} is missing: run `make setup` \
             (or set XLAB_DIGITS to a digits.csv.gz)",
            file.display()
        ))
    }
}

/// Rows of a `.npz` file in file order: training, then `n_val` validation, then `n_test` test.
fn npz(c: &Npz) -> Result<Dataset, String> {
    let path = &c.path.path;
    let arrays = Tensor::read_npz(path).map_err(|e| format!("cannot read {path} as .npz: {e}"))?;
    let get = |name: &str| arrays.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    let names = || arrays.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    let x = get("x").ok_or_else(|| format!("{path} has no array `x` (it has {})", names()))?;
    let y = get("y").ok_or_else(|| format!("{path} has no array `y` (it has {})", names()))?;
    let rows = x.size().first().copied().unwrap_or(0);
    if y.dim() != 1 || y.size()[0] != rows {
        return Err(format!("{path}: `y` must be one label per row of `x` ({rows}), it has shape {:?}", y.size()));
    }
    if !matches!(y.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Err(format!("{path}: `y` must hold integer class labels, it holds {:?}", y.kind()));
    }
    let ids = |name: &str| -> Result<Option<Tensor>, String> {
        match get(name) {
            None => Ok(None),
            Some(t) if t.dim() == 1 && t.size()[0] == rows && !t.is_floating_point() => {
                Ok(Some(t.to_kind(Kind::Int64)))
            }
            Some(t) => Err(format!(
                "{path}: `{name}` must hold one integer id per row ({rows}), it has shape {:?} of {:?}",
                t.size(),
                t.kind()
            )),
        }
    };
    let (group, domain) = (ids("group")?, ids("domain")?);
    let (n_val, n_test) = (c.n_val as i64, c.n_test as i64);
    let n_train = rows - n_val - n_test;
    if n_train < 1 {
        return Err(format!("{path} has {rows} rows; n_val + n_test = {} leaves none for training", n_val + n_test));
    }
    let x = x.to_kind(Kind::Float).reshape([rows, -1]);
    let y = y.to_kind(Kind::Int64);
    let min = y.min().int64_value(&[]);
    if min < 0 {
        return Err(format!("{path}: labels must be 0, 1, …; found {min}"));
    }
    let classes = (y.max().int64_value(&[]) + 1).max(2) as usize;
    let groups = group.as_ref().map(|g| g.max().int64_value(&[]) as usize + 1).unwrap_or(0);
    let part = |start: i64, len: i64| Split {
        x: x.narrow(0, start, len).contiguous(),
        y: y.narrow(0, start, len).contiguous(),
        group: group.as_ref().map(|g| g.narrow(0, start, len).contiguous()),
        domain: domain.as_ref().map(|d| d.narrow(0, start, len).contiguous()),
    };
    Ok(Dataset {
        train: part(0, n_train),
        val: part(n_train, n_val),
        test: part(n_train + n_val, n_test),
        input_dim: x.size()[1] as usize,
        classes,
        groups,
        image: None,
    })
}

/// The 1797 digits (8×8 pixels in 0..=16, scaled to [0, 1]), shuffled by the config's seed and
/// split into test, validation and training examples in that order.
fn digits(c: &Digits) -> Result<Dataset, String> {
    let path = digits_file()?;
    let bad = |m: String| format!("{}: {m}", path.display());
    let raw = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&raw[..]).read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
    let mut rows: Vec<(Vec<f32>, i64)> = Vec::with_capacity(DIGITS_TOTAL);
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: Vec<f32> = line
            .split(',')
            .map(|f| f.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        if v.len() != 65 {
            return Err(bad(format!("line {}: {} fields, expected 65", i + 1, v.len())));
        }
        rows.push((v[..64].iter().map(|p| p / 16.0).collect(), v[64] as i64));
    }
    if rows.len() != DIGITS_TOTAL {
        return Err(bad(format!("{} images, expected {DIGITS_TOTAL}", rows.len())));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    for i in (1..rows.len()).rev() {
        let j = rng.gen_range(0..=i);
        rows.swap(i, j);
    }
    let take = |part: &[(Vec<f32>, i64)]| Split {
        x: Tensor::from_slice(&part.iter().flat_map(|(x, _)| x.iter().copied()).collect::<Vec<f32>>())
            .reshape([part.len() as i64, 64]),
        y: Tensor::from_slice(&part.iter().map(|(_, y)| *y).collect::<Vec<i64>>()),
        group: None,
        domain: None,
    };
    let (test, rest) = rows.split_at(c.n_test);
    let (val, train) = rest.split_at(c.n_val);
    Ok(Dataset {
        train: take(train),
        val: take(val),
        test: take(test),
        input_dim: 64,
        classes: 10,
        groups: 0,
        image: Some([1, 8, 8]),
    })
}

fn split(xs: Vec<f32>, ys: Vec<i64>, dim: usize, sizes: [usize; 3], classes: usize) -> Dataset {
    let x = Tensor::from_slice(&xs).reshape([ys.len() as i64, dim as i64]);
    let y = Tensor::from_slice(&ys);
    let [a, b, c] = sizes.map(|s| s as i64);
    let part = |start: i64, len: i64| Split {
        x: x.narrow(0, start, len).contiguous(),
        y: y.narrow(0, start, len).contiguous(),
        group: None,
        domain: None,
    };
    Dataset {
        train: part(0, a),
        val: part(a, b),
        test: part(a + b, c),
        input_dim: dim,
        classes,
        groups: 0,
        image: None,
    }
}

/// Binary labels with a spurious attribute (see the config's doc); balanced labels in every
/// split, attribute agreeing with the label with the split's correlation.
pub fn spurious(c: &Spurious) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let dim = 2 + c.noise_dims;
    let mut make = |n: usize, corr: f64| {
        let mut xs = Vec::with_capacity(dim * n);
        let mut ys = Vec::with_capacity(n);
        let mut gs = Vec::with_capacity(n);
        for i in 0..n {
            let y = (i % 2) as i64;
            let a = if rng.gen::<f64>() < corr { y } else { 1 - y };
            xs.push(((2 * y - 1) as f64 + c.core_noise * normal(&mut rng)) as f32);
            xs.push(((2 * a - 1) as f64 + c.spurious_noise * normal(&mut rng)) as f32);
            for _ in 0..c.noise_dims {
                xs.push(normal(&mut rng) as f32);
            }
            ys.push(y);
            gs.push(2 * y + a);
        }
        Split {
            x: Tensor::from_slice(&xs).reshape([n as i64, dim as i64]),
            y: Tensor::from_slice(&ys),
            domain: Some(Tensor::from_slice(&gs.iter().map(|g| g % 2).collect::<Vec<i64>>())),
            group: Some(Tensor::from_slice(&gs)),
        }
    };
    let train = make(c.n_train, c.correlation);
    let val = make(c.n_val, c.eval_correlation);
    let test = make(c.n_test, c.eval_correlation);
    Dataset { train, val, test, input_dim: dim, classes: 2, groups: 4, image: None }
}

/// Two interleaved half circles (as scikit-learn's `make_moons`, with angles drawn uniformly at
/// random rather than on a grid) plus Gaussian noise; labels alternate so every split is balanced.
pub fn two_moons(c: &TwoMoons) -> Dataset {
    let n = c.n_train + c.n_val + c.n_test;
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let mut xs = Vec::with_capacity(2 * n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as i64;
        let t = rng.gen::<f64>() * std::f64::consts::PI;
        let (px, py) = if label == 0 { (t.cos(), t.sin()) } else { (1.0 - t.cos(), 0.5 - t.sin()) };
        xs.push((px + c.noise * normal(&mut rng)) as f32);
        xs.push((py + c.noise * normal(&mut rng)) as f32);
        ys.push(label);
    }
    split(xs, ys, 2, [c.n_train, c.n_val, c.n_test], 2)
}

/// One isotropic Gaussian blob per class around a centre drawn uniformly in [-10, 10]^dim.
pub fn blobs(c: &Blobs) -> Dataset {
    let n = c.n_train + c.n_val + c.n_test;
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let centres: Vec<Vec<f64>> =
        (0..c.classes).map(|_| (0..c.dim).map(|_| rng.gen_range(-10.0..10.0)).collect()).collect();
    let mut xs = Vec::with_capacity(c.dim * n);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let label = i % c.classes;
        for centre in &centres[label] {
            xs.push((centre + c.spread * normal(&mut rng)) as f32);
        }
        ys.push(label as i64);
    }
    split(xs, ys, c.dim, [c.n_train, c.n_val, c.n_test], c.classes)
}

/// The order of training examples in one epoch: a function of (seed, epoch) only, so a resumed
/// job sees exactly the order an uninterrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// An epoch drawn with replacement in proportion to `weights` (n draws for n examples): a
/// function of (weights, seed, epoch) only.
pub fn weighted_epoch_order(weights: &[f64], seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1) | (1 << 62));
    let mut cum = Vec::with_capacity(weights.len());
    let mut total = 0.0;
    for w in weights {
        total += w;
        cum.push(total);
    }
    (0..weights.len())
        .map(|_| {
            let u = rng.gen::<f64>() * total;
            cum.partition_point(|c| *c <= u).min(weights.len() - 1) as i64
        })
        .collect()
}

/// An epoch in which example i appears `counts[i]` times, the multiset shuffled: a function of
/// (counts, seed, epoch) only.
pub fn repeat_epoch_order(counts: &[u32], seed: u64, epoch: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1) | (1 << 61));
    let mut order: Vec<i64> =
        counts.iter().enumerate().flat_map(|(i, &k)| std::iter::repeat_n(i as i64, k as usize)).collect();
    for i in (1..order.len()).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_in_their_seed() {
        let c = TwoMoons { n_train: 10, n_val: 4, n_test: 6, noise: 0.1, seed: 3 };
        let a = two_moons(&c);
        let b = two_moons(&c);
        assert!(a.train.x.equal(&b.train.x) && a.test.y.equal(&b.test.y));
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (10, 4, 6));
        let other = two_moons(&TwoMoons { seed: 4, ..c });
        assert!(!a.train.x.equal(&other.train.x));
    }

    #[test]
    fn epoch_order_is_a_permutation_that_depends_on_seed_and_epoch() {
        let o = epoch_order(100, 1, 0);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(o, epoch_order(100, 1, 0));
        assert_ne!(o, epoch_order(100, 1, 1));
        assert_ne!(o, epoch_order(100, 2, 0));
    }

    #[test]
    fn repeat_epoch_order_holds_each_example_its_count_of_times() {
        // The JTT vector of METHODS.md 4.3: N=10, E={2,7}, λ_up=3 gives 16 items, 2 and 7 four times.
        let counts: Vec<u32> = (0..10).map(|i| if i == 2 || i == 7 { 4 } else { 1 }).collect();
        let o = repeat_epoch_order(&counts, 5, 0);
        assert_eq!(o.len(), 16);
        for i in 0..10 {
            assert_eq!(o.iter().filter(|&&k| k == i).count(), counts[i as usize] as usize);
        }
        assert_eq!(o, repeat_epoch_order(&counts, 5, 0));
        assert_ne!(o, repeat_epoch_order(&counts, 5, 1));
    }

    #[test]
    fn spurious_groups_follow_the_correlation() {
        let c = Spurious {
            n_train: 4000,
            n_val: 0,
            n_test: 4000,
            correlation: 0.9,
            eval_correlation: 0.5,
            core_noise: 1.0,
            spurious_noise: 0.1,
            noise_dims: 3,
            seed: 1,
        };
        let d = spurious(&c);
        assert_eq!(d.train.x.size(), vec![4000, 5]);
        let counts = d.group_counts();
        // groups 0 (y0,a0) and 3 (y1,a1) are the majority: 45% each; 1 and 2: 5% each.
        assert_eq!(counts.iter().sum::<u64>(), 4000);
        for (g, expect) in [(0, 1800.0), (1, 200.0), (2, 200.0), (3, 1800.0)] {
            assert!((counts[g] as f64 - expect).abs() < 60.0, "group {g}: {counts:?}");
        }
        let test: Vec<i64> =
            d.test.group.as_ref().unwrap().bincount::<Tensor>(None, 4).iter::<i64>().unwrap().collect();
        assert!(test.iter().all(|&n| (n - 1000).abs() < 80), "{test:?}");
    }

    #[test]
    fn weighted_order_follows_the_weights() {
        // Example 0 weighs 3, example 1 weighs 1, example 2 weighs 0.
        let w: Vec<f64> = (0..3000).map(|i| [3.0, 1.0, 0.0][i % 3]).collect();
        let order = weighted_epoch_order(&w, 4, 2);
        assert_eq!(order.len(), 3000);
        let mut counts = [0usize; 3];
        for i in &order {
            counts[(*i % 3) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((counts[0] as f64 / 3000.0 - 0.75).abs() < 0.03, "{counts:?}");
        assert_eq!(order, weighted_epoch_order(&w, 4, 2));
        assert_ne!(order, weighted_epoch_order(&w, 4, 3));
    }

    #[test]
    fn blobs_have_the_requested_shape_and_balanced_labels() {
        let d = blobs(&Blobs { n_train: 30, n_val: 3, n_test: 6, classes: 3, dim: 5, spread: 1.0, seed: 0 });
        assert_eq!(d.train.x.size(), vec![30, 5]);
        assert_eq!(d.train.y.bincount::<Tensor>(None, 3).iter::<i64>().unwrap().collect::<Vec<_>>(), vec![10, 10, 10]);
    }
}
