//! Datasets. Generators are deterministic in their own seed (ChaCha8 streams, Box–Muller normals),
//! so a dataset is the same on every machine and in every process.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use xlab_plan::config::{Blobs, Cifar, Csv, DataConfig, Digits, Npz, Spurious, TwoMoons, DIGITS_TOTAL};

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
    /// With `standardize: true`: the training split's per-feature statistics every split was
    /// scaled with.
    pub standardized: Option<Standardization>,
    /// An image folder's training images read as training goes (`stream: true`); `train.x` is
    /// then empty.
    pub train_stream: Option<std::sync::Arc<crate::images::Stream>>,
}

/// The training split's features as a training job reads them: in memory (on its device), or
/// streamed from an image folder.
pub enum TrainX {
    Memory(Tensor),
    Stream(std::sync::Arc<crate::images::Stream>, tch::Device),
}

impl TrainX {
    pub fn new(data: &Dataset, device: tch::Device) -> TrainX {
        match &data.train_stream {
            Some(s) => TrainX::Stream(std::sync::Arc::clone(s), device),
            None => TrainX::Memory(data.train.x.to_device(device)),
        }
    }

    pub fn len(&self) -> i64 {
        match self {
            TrainX::Memory(t) => t.size()[0],
            TrainX::Stream(s, _) => s.len() as i64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of these training examples (indices on any device), on the job's device.
    pub fn rows(&self, idx: &Tensor) -> Result<Tensor, String> {
        match self {
            TrainX::Memory(t) => Ok(t.index_select(0, &idx.to_device(t.device()))),
            TrainX::Stream(s, device) => {
                let ids = Vec::<i64>::try_from(&idx.to_device(tch::Device::Cpu)).map_err(|e| e.to_string())?;
                Ok(s.rows(&ids)?.to_device(*device))
            }
        }
    }
}

/// Per-feature mean and standard deviation (of the training split; a constant feature's
/// standard deviation is taken as 1, as scikit-learn's `StandardScaler` does).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Standardization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Dataset {
    /// Scales every split's features by the training split's mean and standard deviation
    /// (population, ddof 0, in double precision).
    pub fn standardize(mut self) -> Dataset {
        let x = self.train.x.to_kind(Kind::Double);
        let mean = x.mean_dim(Some([0i64].as_slice()), false, Kind::Double);
        let std = x.std_dim(Some([0i64].as_slice()), false, false);
        let std = std.where_self(&std.gt(0.0), &std.ones_like());
        for split in [&mut self.train, &mut self.val, &mut self.test] {
            if split.x.numel() > 0 {
                split.x = ((split.x.to_kind(Kind::Double) - &mean) / &std).to_kind(Kind::Float);
            }
        }
        let v = |t: &Tensor| Vec::<f64>::try_from(t).unwrap_or_default();
        self.standardized = Some(Standardization { mean: v(&mean), std: v(&std) });
        self
    }

    /// Whether the training features look unscaled: some feature's typical magnitude is in the
    /// hundreds or more (a raw tabular file), which plain SGD often cannot train on.
    pub fn looks_unscaled(&self) -> bool {
        self.standardized.is_none()
            && self.image.is_none()
            && self.train.x.numel() > 0
            && self.train.x.abs().mean_dim(Some([0i64].as_slice()), false, Kind::Double).max().double_value(&[])
                >= 100.0
    }
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

/// The data as a job of `task` reads it: an image folder with `stream: true` is streamed by
/// training only (every other task decodes it into memory).
pub fn build_for(task: xlab_plan::config::Task, cfg: &DataConfig) -> Result<Dataset, String> {
    match cfg {
        DataConfig::ImageFolder(c) if c.stream && task == xlab_plan::config::Task::Train => {
            crate::images::image_folder(c, true)
        }
        _ => build(cfg),
    }
}

pub fn build(cfg: &DataConfig) -> Result<Dataset, String> {
    Ok(match cfg {
        DataConfig::TwoMoons(c) => two_moons(c),
        DataConfig::Blobs(c) => blobs(c),
        DataConfig::Spurious(c) => spurious(c),
        DataConfig::Digits(c) => digits(c)?,
        DataConfig::Npz(c) => npz(c)?,
        DataConfig::Csv(c) => csv(c)?,
        DataConfig::Cifar10(c) => cifar(c, false)?,
        DataConfig::Cifar100(c) => cifar(c, true)?,
        DataConfig::Idx(c) => idx(c)?,
        DataConfig::ImageFolder(c) => crate::images::image_folder(c, false)?,
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

/// A file's bytes, gunzipped when it is gzip (by its magic bytes); `name` or `name.gz`.
fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let path = if plain.exists() { plain } else { gz };
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{} is not valid gzip: {e}", path.display()))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// CIFAR-10/100 binary files: per image a label byte (CIFAR-100: coarse, then fine) and
/// 3×32×32 pixel bytes, channel-major.
fn cifar(c: &Cifar, hundred: bool) -> Result<Dataset, String> {
    let dir = Path::new(&c.path.path);
    let (train_files, test_file, label_bytes): (Vec<String>, &str, usize) = if hundred {
        (vec!["train.bin".into()], "test.bin", 2)
    } else {
        ((1..=5).map(|i| format!("data_batch_{i}.bin")).collect(), "test_batch.bin", 1)
    };
    let read = |names: &[String]| -> Result<Labelled, String> {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for name in names {
            let bytes = read_file(dir, name)?;
            let rec = label_bytes + 3072;
            if bytes.is_empty() || bytes.len() % rec != 0 {
                return Err(format!(
                    "{}: {} bytes is not a whole number of {rec}-byte CIFAR records",
                    dir.join(name).display(),
                    bytes.len()
                ));
            }
            for r in bytes.chunks(rec) {
                ys.push(i64::from(r[label_bytes - 1]));
                xs.extend_from_slice(&r[label_bytes..]);
            }
        }
        Ok((xs, ys))
    };
    let train = read(&train_files)?;
    let test = read(&[test_file.to_string()])?;
    images_split(train, test, [3, 32, 32], c.n_val, c.normalize, if hundred { 100 } else { 10 })
}

/// An IDX file's dimensions and bytes (MNIST: magic 0x00000803 for images, 0x00000801 labels).
fn idx_file(dir: &Path, name: &str) -> Result<(Vec<usize>, Vec<u8>), String> {
    parse_idx(&read_file(dir, name)?, &dir.join(name).display().to_string())
}

/// An IDX file's dimensions and bytes from its content (`name` for messages).
fn parse_idx(bytes: &[u8], name: &str) -> Result<(Vec<usize>, Vec<u8>), String> {
    let bad = || format!("{name}: not an IDX file of unsigned bytes");
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad());
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(bad());
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    // Dimensions whose product overflows can never match the file's size.
    if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) != Some(bytes.len() - header) {
        return Err(format!("{name}: the header's dimensions {dims:?} do not match its size"));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Pixel bytes and their labels.
type Labelled = (Vec<u8>, Vec<i64>);

/// MNIST-style IDX files.
fn idx(c: &Cifar) -> Result<Dataset, String> {
    let dir = Path::new(&c.path.path);
    let part = |images: &str, labels: &str| -> Result<(Labelled, [usize; 2]), String> {
        let (d, x) = idx_file(dir, images)?;
        let (l, y) = idx_file(dir, labels)?;
        if d.len() != 3 || l.len() != 1 || d[0] != l[0] {
            return Err(format!("{images} and {labels} in {} do not hold images and their labels", dir.display()));
        }
        Ok(((x, y.into_iter().map(i64::from).collect()), [d[1], d[2]]))
    };
    let (train, [h, w]) = part("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let (test, hw) = part("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    if hw != [h, w] {
        return Err(format!("training images are {h}×{w}, test images {}×{}", hw[0], hw[1]));
    }
    let classes = train.1.iter().chain(&test.1).copied().max().unwrap_or(1) as usize + 1;
    images_split(train, test, [1, h as i64, w as i64], c.n_val, c.normalize, classes.max(2))
}

/// Pixel bytes to floats in [0, 1] (standardized per channel by the training split's statistics
/// with `normalize`); the last `n_val` training images become the validation split.
fn images_split(
    (train_x, train_y): Labelled,
    (test_x, test_y): Labelled,
    shape: [i64; 3],
    n_val: usize,
    normalize: bool,
    classes: usize,
) -> Result<Dataset, String> {
    let n = train_y.len();
    if n_val >= n {
        return Err(format!("n_val = {n_val} leaves none of the {n} training images for training"));
    }
    let dim = shape.iter().product::<i64>();
    let to_x = |b: &[u8], rows: usize| Tensor::from_slice(b).to_kind(Kind::Float).reshape([rows as i64, dim]) / 255.0;
    let mut x = to_x(&train_x, n);
    let mut xt = to_x(&test_x, test_y.len());
    let n_train = (n - n_val) as i64;
    if normalize {
        let per_channel = x.narrow(0, 0, n_train).reshape([n_train, shape[0], -1]);
        let mean = per_channel.mean_dim(&[0i64, 2][..], true, Kind::Float);
        let std = per_channel.std_dim(&[0i64, 2][..], false, true).clamp_min(1e-8);
        let norm = |t: &Tensor| ((t.reshape([-1, shape[0], shape[1] * shape[2]]) - &mean) / &std).reshape([-1, dim]);
        x = norm(&x);
        xt = norm(&xt);
    }
    let y = Tensor::from_slice(&train_y);
    let split = |x: &Tensor, y: &Tensor, start: i64, len: i64| Split {
        x: x.narrow(0, start, len).contiguous(),
        y: y.narrow(0, start, len).contiguous(),
        group: None,
        domain: None,
    };
    Ok(Dataset {
        train: split(&x, &y, 0, n_train),
        val: split(&x, &y, n_train, n_val as i64),
        test: split(&xt, &Tensor::from_slice(&test_y), 0, test_y.len() as i64),
        input_dim: dim as usize,
        classes,
        groups: 0,
        image: Some(shape),
        standardized: None,
        train_stream: None,
    })
}

/// Rows of a `.npz` file in file order: training, then `n_val` validation, then `n_test` test.
fn npz(c: &Npz) -> Result<Dataset, String> {
    let path = &c.path.path;
    let arrays = crate::npz::read(path).map_err(|e| format!("cannot read {path} as .npz: {e}"))?;
    let get = |name: &str| -> Option<Result<Tensor, String>> {
        arrays.iter().find(|a| a.name == name).map(|a| a.to_tensor().map_err(|e| format!("{path}: {e}")))
    };
    let names = || arrays.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ");
    let x = get("x").ok_or_else(|| format!("{path} has no array `x` (it has {})", names()))??;
    let y = get("y").ok_or_else(|| format!("{path} has no array `y` (it has {})", names()))??;
    let rows = x.size().first().copied().unwrap_or(0);
    if x.dim() == 0 {
        return Err(format!("{path}: `x` must hold one row of features per example, it is a single number"));
    }
    if rows == 0 || x.numel() == 0 {
        return Err(format!("{path}: `x` has no examples (shape {:?})", x.size()));
    }
    if y.dim() != 1 || y.size()[0] != rows {
        return Err(format!("{path}: `y` must be one label per row of `x` ({rows}), it has shape {:?}", y.size()));
    }
    if !matches!(y.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Err(format!("{path}: `y` must hold integer class labels, it holds {:?}", y.kind()));
    }
    let ids = |name: &str| -> Result<Option<Tensor>, String> {
        match get(name).transpose()? {
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
    let x = x.to_kind(Kind::Float).reshape([rows, -1]);
    let d = in_file_order(path, x, y.to_kind(Kind::Int64), group, domain, (c.n_val, c.n_test), c.image)?;
    Ok(if c.standardize { d.standardize() } else { d })
}

/// A dataset from whole-file arrays: the rows in file order are training, then `n_val`
/// validation, then `n_test` test examples.
fn in_file_order(
    path: &str,
    x: Tensor,
    y: Tensor,
    group: Option<Tensor>,
    domain: Option<Tensor>,
    (n_val, n_test): (usize, usize),
    image: Option<[usize; 3]>,
) -> Result<Dataset, String> {
    let rows = x.size()[0];
    let (n_val, n_test) = (n_val as i64, n_test as i64);
    let n_train = rows - n_val - n_test;
    if n_train < 1 {
        return Err(format!("{path} has {rows} rows; n_val + n_test = {} leaves none for training", n_val + n_test));
    }
    if let Some([c, h, w]) = image {
        if x.size()[1] != (c * h * w) as i64 {
            return Err(format!("{path}: rows hold {} features, not image: [{c}, {h}, {w}]", x.size()[1]));
        }
    }
    let min = y.min().int64_value(&[]);
    if min < 0 {
        return Err(format!("{path}: labels must be 0, 1, …; found {min}"));
    }
    let classes = (y.max().int64_value(&[]) + 1).max(2) as usize;
    for (name, ids) in [("group", &group), ("domain", &domain)] {
        if let Some(t) = ids {
            let min = t.min().int64_value(&[]);
            if min < 0 {
                return Err(format!("{path}: {name} ids must be 0, 1, …; found {min}"));
            }
        }
    }
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
        image: image.map(|[c, h, w]| [c as i64, h as i64, w as i64]),
        standardized: None,
        train_stream: None,
    })
}

/// A CSV file with a header: the label column (integers, or names numbered in sorted order),
/// optional group and domain id columns, and numeric features in every other column.
fn csv(c: &Csv) -> Result<Dataset, String> {
    let path = &c.path.path;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path} as CSV: {e}"))?;
    csv_from(c, std::io::BufReader::new(file))
}

/// [`csv`] from any reader (`c.path` names it in messages).
fn csv_from(c: &Csv, input: impl std::io::Read) -> Result<Dataset, String> {
    let path = &c.path.path;
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(input);
    let header: Vec<String> =
        reader.headers().map_err(|e| format!("{path}: header: {e}"))?.iter().map(str::to_string).collect();
    let column = |name: &str, what: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("{path} has no {what} column `{name}`; its columns are {}", header.join(", ")))
    };
    let label = column(&c.label, "label")?;
    let group = c.group.as_deref().map(|g| column(g, "group")).transpose()?;
    let domain = c.domain.as_deref().map(|d| column(d, "domain")).transpose()?;
    let features: Vec<usize> =
        (0..header.len()).filter(|i| ![Some(label), group, domain].contains(&Some(*i))).collect();
    if features.is_empty() {
        return Err(format!("{path} has no feature columns besides the label, group and domain"));
    }
    let (mut xs, mut labels, mut gs, mut ds) = (Vec::new(), Vec::<String>::new(), Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| format!("{path}: line {line}: {e}"))?;
        let field = |col: usize| record.get(col).unwrap_or("");
        for &f in &features {
            let v = field(f).parse::<f32>().map_err(|_| {
                format!("{path}:{line}: column `{}` holds `{}`, which is not a number", header[f], field(f))
            })?;
            xs.push(v);
        }
        labels.push(field(label).to_string());
        for (col, out) in [(group, &mut gs), (domain, &mut ds)] {
            if let Some(col) = col {
                let v = field(col).parse::<i64>().map_err(|_| {
                    format!(
                        "{path}:{line}: column `{}` holds `{}`, which is not an integer id",
                        header[col],
                        field(col)
                    )
                })?;
                out.push(v);
            }
        }
    }
    if labels.is_empty() {
        return Err(format!("{path} has a header and no rows"));
    }
    let y: Vec<i64> = match labels.iter().map(|l| l.parse::<i64>()).collect::<Result<Vec<_>, _>>() {
        Ok(y) => y,
        Err(_) => {
            let names: std::collections::BTreeSet<&String> = labels.iter().collect();
            let names: Vec<&String> = names.into_iter().collect();
            labels.iter().map(|l| names.binary_search(&l).expect("every label is a name") as i64).collect()
        }
    };
    let rows = y.len() as i64;
    let x = Tensor::from_slice(&xs).reshape([rows, features.len() as i64]);
    let ids = |v: Vec<i64>| (!v.is_empty()).then(|| Tensor::from_slice(&v));
    let d = in_file_order(path, x, Tensor::from_slice(&y), ids(gs), ids(ds), (c.n_val, c.n_test), c.image)?;
    Ok(if c.standardize { d.standardize() } else { d })
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
        standardized: None,
        train_stream: None,
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
        standardized: None,
        train_stream: None,
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
    Dataset {
        train,
        val,
        test,
        input_dim: dim,
        classes: 2,
        groups: 4,
        image: None,
        standardized: None,
        train_stream: None,
    }
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

/// Per-example augmentation draws for one epoch, in the epoch's visiting order: crop offsets
/// in [0, 2·crop] and flips, a function of (seed, epoch) only (resumable like the order).
pub fn augment_draws(n: usize, seed: u64, epoch: u64, crop: u32, flip: bool) -> (Vec<i64>, Vec<i64>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6175_676d_656e_7421);
    rng.set_stream(epoch.wrapping_add(1));
    let span = 2 * i64::from(crop) + 1;
    let mut oy = Vec::with_capacity(n);
    let mut ox = Vec::with_capacity(n);
    let mut fl = Vec::with_capacity(n);
    for _ in 0..n {
        oy.push(rng.gen_range(0..span));
        ox.push(rng.gen_range(0..span));
        fl.push(flip && rng.gen_bool(0.5));
    }
    (oy, ox, fl)
}

/// Crops (after zero padding by `pad`) at offsets (`oy`, `ox`) and mirrors where `flip`, per
/// image of a batch of flattened `image`-shaped rows; two gathers on the device.
pub fn augment_batch(x: &Tensor, image: [i64; 3], pad: i64, oy: &Tensor, ox: &Tensor, flip: &Tensor) -> Tensor {
    let [c, h, w] = image;
    let b = x.size()[0];
    let dev = x.device();
    let padded = x.reshape([b, c, h, w]).constant_pad_nd([pad, pad, pad, pad]);
    let ar = |n: i64| Tensor::arange(n, (Kind::Int64, dev));
    let rows = (oy.unsqueeze(1) + ar(h).unsqueeze(0)).view([b, 1, h, 1]).expand([b, c, h, w + 2 * pad], false);
    let cols_fwd = ar(w).unsqueeze(0);
    let cols_rev = (ar(w) * -1 + (w - 1)).unsqueeze(0);
    let cols = ox.unsqueeze(1) + cols_rev.where_self(&flip.unsqueeze(1), &cols_fwd);
    let cols = cols.view([b, 1, 1, w]).expand([b, c, h, w], false);
    padded.gather(2, &rows, false).gather(3, &cols, false).reshape([b, c * h * w])
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
    use std::io::Write;
    use xlab_plan::config::FileRef;

    fn folder(dir: &Path) -> Cifar {
        Cifar { path: FileRef { path: dir.display().to_string(), sha256: None }, n_val: 1, normalize: false }
    }

    /// The CSV and IDX readers never panic, whatever the file holds (`make fuzz` runs them
    /// longer; see the xlab-fuzz crate).
    #[test]
    fn fuzz_csv_files() {
        let dict: &[&[u8]] = &[
            b"label", b"group", b",", b"\n", b"\r\n", b"\"", b"nan", b"inf", b"-1", b"1e40", b"cat", b" ", b"\"a,b\"",
            b"x1",
        ];
        let mut cfg = Csv {
            path: FileRef { path: "fuzz.csv".into(), sha256: None },
            label: "label".into(),
            group: None,
            domain: None,
            n_val: 1,
            n_test: 1,
            image: None,
            standardize: false,
        };
        let mut k = 0u64;
        xlab_fuzz::check("csv", dict, 3_000, |bytes| {
            k += 1;
            cfg.group = k.is_multiple_of(3).then(|| "group".to_string());
            csv_from(&cfg, bytes).map(|_| ())
        });
    }

    #[test]
    fn fuzz_idx_files() {
        let dict: &[&[u8]] = &[b"\x00\x00\x08\x03", b"\x00\x00\x08\x01", b"\x00\x00\x00\x02", b"\xff\xff\xff\xff"];
        xlab_fuzz::check("idx", dict, 50_000, |bytes| parse_idx(bytes, "fuzz").map(|_| ()));
    }

    /// `standardize: true` scales every split by the training split's mean and population
    /// standard deviation (scikit-learn's `StandardScaler`); a constant feature keeps std 1.
    #[test]
    fn standardize_uses_the_training_split_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        std::fs::write(&path, "a,b,label\n1,5,0\n2,5,1\n3,5,0\n10,5,1\n").unwrap();
        let cfg = Csv {
            path: FileRef { path: path.display().to_string(), sha256: None },
            label: "label".into(),
            group: None,
            domain: None,
            n_val: 0,
            n_test: 1,
            image: None,
            standardize: true,
        };
        let d = csv(&cfg).unwrap();
        let st = d.standardized.as_ref().unwrap();
        let sd = (2.0f64 / 3.0).sqrt();
        assert!((st.mean[0] - 2.0).abs() < 1e-12 && (st.std[0] - sd).abs() < 1e-12, "{st:?}");
        assert_eq!((st.mean[1], st.std[1]), (5.0, 1.0), "a constant feature");
        let train = Vec::<f32>::try_from(d.train.x.flatten(0, -1)).unwrap();
        let want = [-1.0 / sd, 0.0, 0.0, 0.0, 1.0 / sd, 0.0];
        for (g, w) in train.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{train:?}");
        }
        let test = Vec::<f32>::try_from(d.test.x.flatten(0, -1)).unwrap();
        assert!((f64::from(test[0]) - 8.0 / sd).abs() < 1e-5, "the test row uses the training statistics: {test:?}");
        assert!(!d.looks_unscaled());
    }

    fn npz_at(path: &Path) -> Npz {
        Npz {
            path: FileRef { path: path.display().to_string(), sha256: None },
            n_val: 0,
            n_test: 1,
            image: None,
            standardize: false,
        }
    }

    /// numpy saves a transposed array in Fortran order; xlab reads it as numpy does (it used
    /// to refuse it), and an archive with no rows is refused with a message (it used to panic).
    #[test]
    fn npz_files_in_fortran_order_read_as_numpy_and_empty_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let py = dir.path().join("write.py");
        std::fs::write(
            &py,
            "import sys, numpy as np\nd = sys.argv[1]\nx = np.arange(12, dtype=np.float32).reshape(3, 4)\n\
             y = np.array([0, 1, 0])\nnp.savez(d + '/c.npz', x=x, y=y)\nnp.savez(d + '/f.npz', x=np.asfortranarray(x), y=y)\n\
             np.savez(d + '/t.npz', x=np.ascontiguousarray(x.T).T, y=y)\n\
             np.savez(d + '/empty.npz', x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))\n",
        )
        .unwrap();
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        let out = std::process::Command::new(python).arg(&py).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let c = npz(&npz_at(&dir.path().join("c.npz"))).unwrap();
        for name in ["f.npz", "t.npz"] {
            let f = npz(&npz_at(&dir.path().join(name))).unwrap();
            assert_eq!(
                Vec::<f32>::try_from(f.train.x.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(c.train.x.flatten(0, -1)).unwrap()
            );
            assert_eq!(Vec::<f32>::try_from(f.test.x.flatten(0, -1)).unwrap(), vec![8.0, 9.0, 10.0, 11.0]);
        }
        let err = npz(&npz_at(&dir.path().join("empty.npz"))).err().unwrap();
        assert!(err.contains("`x` has no examples (shape [0, 4])"), "{err}");
    }

    #[test]
    fn idx_headers_whose_dimensions_overflow_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // 2³¹ · 2³¹ · 4 = 2⁶⁴: a product that wraps to 0, which an empty body would "match".
        let mut bytes = vec![0, 0, 0x08, 3];
        for d in [1u32 << 31, 1 << 31, 4] {
            bytes.extend(d.to_be_bytes());
        }
        std::fs::write(dir.path().join("f"), &bytes).unwrap();
        let err = idx_file(dir.path(), "f").unwrap_err();
        assert!(err.contains("do not match its size"), "{err}");
    }

    #[test]
    fn cifar10_binary_batches_become_labelled_images() {
        let dir = tempfile::tempdir().unwrap();
        // Image i of file f: label (f + i) % 10, every pixel byte = 10·f + i.
        for (f, name) in [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin",
        ]
        .iter()
        .enumerate()
        {
            let mut bytes = Vec::new();
            for i in 0..2u8 {
                bytes.push((f as u8 + i) % 10);
                bytes.extend(std::iter::repeat_n(10 * f as u8 + i, 3072));
            }
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let d = cifar(&folder(dir.path()), false).unwrap();
        assert_eq!((d.train.len(), d.val.len(), d.test.len(), d.image), (9, 1, 2, Some([3, 32, 32])));
        assert_eq!(Vec::<i64>::try_from(&d.train.y).unwrap(), [0, 1, 1, 2, 2, 3, 3, 4, 4]);
        assert_eq!(Vec::<i64>::try_from(&d.test.y).unwrap(), [5, 6]);
        assert!((d.train.x.double_value(&[2, 100]) - 10.0 / 255.0).abs() < 1e-6);
        std::fs::write(dir.path().join("test_batch.bin"), [0u8; 100]).unwrap();
        let e = cifar(&folder(dir.path()), false).err().unwrap();
        assert!(e.contains("test_batch.bin: 100 bytes is not a whole number of 3073-byte CIFAR records"), "{e}");
    }

    #[test]
    fn gzipped_idx_files_become_images_standardized_by_the_training_split() {
        let dir = tempfile::tempdir().unwrap();
        let write_idx = |name: &str, dims: &[u32], data: &[u8]| {
            let mut bytes = vec![0, 0, 8, dims.len() as u8];
            for d in dims {
                bytes.extend(d.to_be_bytes());
            }
            bytes.extend(data);
            let f = std::fs::File::create(dir.path().join(format!("{name}.gz"))).unwrap();
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            gz.write_all(&bytes).unwrap();
            gz.finish().unwrap();
        };
        let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        write_idx("train-images-idx3-ubyte", &[5, 4, 3], &pixels);
        write_idx("train-labels-idx1-ubyte", &[5], &[0, 1, 2, 1, 0]);
        write_idx("t10k-images-idx3-ubyte", &[2, 4, 3], &pixels[..24]);
        write_idx("t10k-labels-idx1-ubyte", &[2], &[2, 0]);
        let mut c = folder(dir.path());
        c.normalize = true;
        let d = idx(&c).unwrap();
        assert_eq!((d.train.len(), d.val.len(), d.test.len(), d.image, d.classes), (4, 1, 2, Some([1, 4, 3]), 3));
        let mean = f64::try_from(d.train.x.mean(Kind::Double)).unwrap();
        let std = f64::try_from(d.train.x.std(false)).unwrap();
        assert!(mean.abs() < 1e-6 && (std - 1.0).abs() < 1e-5, "standardized: mean {mean}, std {std}");
    }

    #[test]
    fn augmentation_crops_and_flips_each_image_as_drawn() {
        // Two 1×3×3 images with pixel values 0..8 and 10..18.
        let x = Tensor::from_slice(&(0..18).map(|i| (i % 9 + 10 * (i / 9)) as f32).collect::<Vec<_>>()).reshape([2, 9]);
        let t = |v: &[i64]| Tensor::from_slice(v);
        // Image 0: offset (0, 0) with padding 1 → shifted down-right, zeros at the top/left edge.
        // Image 1: offset (1, 1) (no shift), mirrored.
        let out = augment_batch(&x, [1, 3, 3], 1, &t(&[0, 1]), &t(&[0, 1]), &Tensor::from_slice(&[false, true]));
        let got = Vec::<f32>::try_from(out.flatten(0, -1)).unwrap();
        assert_eq!(&got[..9], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 3.0, 4.0]);
        assert_eq!(&got[9..], [12.0, 11.0, 10.0, 15.0, 14.0, 13.0, 18.0, 17.0, 16.0]);
        let (oy, ox, fl) = augment_draws(1000, 3, 2, 4, true);
        assert!(oy.iter().chain(&ox).all(|o| (0..=8).contains(o)));
        let flips = fl.iter().filter(|f| **f).count();
        assert!((400..600).contains(&flips), "{flips}");
        assert_eq!(augment_draws(1000, 3, 2, 4, true), (oy, ox, fl), "a function of (seed, epoch)");
    }

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
        // The JTT vector of docs/methods.md §4.3: N=10, E={2,7}, λ_up=3 gives 16 items, 2 and 7 four times.
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
