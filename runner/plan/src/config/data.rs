//! The data a job reads (`data:`): generators, the built-in digits, CIFAR and IDX folders, npz
//! and CSV files, with their split sizes, standardization and image shapes; and their checks.

use super::{defaults, is_false, FileRef};
use serde::{Deserialize, Serialize};

/// A dataset. Generators are deterministic in their own `seed`, independent of the job's seed,
/// so that every seed of a sweep sees the same data.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum DataConfig {
    /// Two interleaved half circles in 2-D with Gaussian noise; 2 classes.
    TwoMoons(TwoMoons),
    /// Binary labels with a spurious attribute that agrees with the label with probability
    /// `correlation` in the training split and `eval_correlation` in validation and test;
    /// group = 2·label + attribute. The standard test bed for DRO and selective mixup.
    Spurious(Spurious),
    /// Isotropic Gaussian blobs, one per class, centres drawn uniformly in [-10, 10]^dim (as
    /// scikit-learn's `make_blobs`).
    Blobs(Blobs),
    /// The UCI handwritten digits as scikit-learn ships them (1797 images of 8×8 pixels,
    /// 10 classes), read offline from the installed package; shuffled by `seed` and split
    /// into test, validation and the remaining training examples.
    Digits(Digits),
    /// Arrays from a NumPy `.npz` file: `x` (rows × features, or rows × …, flattened), `y`
    /// (integer labels 0..classes), and optional `group` and `domain` (integer ids per row).
    /// Rows are used in file order: the last `n_test` are the test split, the `n_val` before
    /// them the validation split, the rest the training split.
    Npz(Npz),
    /// A CSV file with a header row: the `label` column holds the class (integers 0, 1, …, or
    /// names, numbered in sorted order), the optional `group` and `domain` columns integer ids,
    /// and every other column a numeric feature. Rows are split in file order as for `npz`.
    Csv(Csv),
    /// CIFAR-10 in its binary form: `path` is the `cifar-10-batches-bin` folder
    /// (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`). The last `n_val` training
    /// images are the validation split. Pixels are scaled to [0, 1] and, with `normalize`
    /// (default), standardized per channel with the training split's mean and std.
    Cifar10(Cifar),
    /// CIFAR-100 in its binary form (`train.bin`, `test.bin` in `path`), fine labels.
    Cifar100(Cifar),
    /// MNIST-style IDX files (Fashion-MNIST too), gzipped or not: `path` is a folder with
    /// `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    /// `t10k-labels-idx1-ubyte` (each optionally `.gz`).
    Idx(Cifar),
    /// A folder of image files in the layout torchvision's `ImageFolder` reads:
    /// `path/train/<class>/*.png|jpg|jpeg`, `path/test/<class>/…` and optionally
    /// `path/val/<class>/…`; a folder with `train` and `val` only (as ImageNet and Imagenette
    /// ship) evaluates on `val` as its test split. The classes are the subfolders of `train`,
    /// numbered in sorted order; `val` and `test` use the same names. Each image is decoded (PNG or JPEG, grey,
    /// colour or with alpha, which is dropped), converted to `channels` (3: RGB, 1: grey) and
    /// resized to `size` = [height, width] with PIL's antialiased bilinear filter and integer
    /// arithmetic (PIL's `resize(…, BILINEAR)` to within one level). The folder is decoded into
    /// memory when the job starts, on the job's threads (see `stream` for larger folders).
    /// Pixels are scaled to [0, 1] and, with `normalize` (default), standardized per channel
    /// with the mean and std of the training split (of 10,000 of its images drawn once, when it
    /// has more). Without a `val` folder, `n_val` training images
    /// drawn at random (a fixed draw) become the validation split.
    ImageFolder(ImageFolder),
}

/// `data: {name: image_folder, path: DIR, size: [H, W]}`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageFolder {
    pub path: FileRef,
    /// [height, width] every image is resized to.
    pub size: [usize; 2],
    #[serde(default)]
    pub n_val: usize,
    #[serde(default = "defaults::yes")]
    pub normalize: bool,
    /// 3 (RGB) or 1 (grey).
    #[serde(default = "defaults::three")]
    pub channels: usize,
    /// Training (`task: train`) reads the training images as it goes, each batch decoded ahead
    /// of the step on the job's threads, instead of decoding the folder into memory first: for
    /// folders larger than memory. The results are the same bytes either way.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Npz {
    pub path: FileRef,
    #[serde(default)]
    pub n_val: usize,
    pub n_test: usize,
    /// The (channels, height, width) of each row of `x`, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// Scale each feature to mean 0 and standard deviation 1 with the training split's
    /// statistics (as scikit-learn's `StandardScaler`), applied to every split.
    #[serde(default, skip_serializing_if = "is_false")]
    pub standardize: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Csv {
    pub path: FileRef,
    /// The name of the label column.
    #[serde(default = "defaults::label_column")]
    pub label: String,
    /// The name of a column of group ids (for group metrics and DRO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The name of a column of domain ids (for selective mixup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default)]
    pub n_val: usize,
    pub n_test: usize,
    /// The (channels, height, width) of each row's features, for image models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// Scale each feature to mean 0 and standard deviation 1 with the training split's
    /// statistics, applied to every split.
    #[serde(default, skip_serializing_if = "is_false")]
    pub standardize: bool,
}

/// An image dataset read from a folder of standard files.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cifar {
    pub path: FileRef,
    #[serde(default)]
    pub n_val: usize,
    #[serde(default = "defaults::yes")]
    pub normalize: bool,
}

impl DataConfig {
    /// `Some(shape)` for image data, with the (channels, height, width) when the config fixes it
    /// (`None` inside for folders whose files tell); `None` for vectors.
    pub fn image_shape(&self) -> Option<Option<[usize; 3]>> {
        match self {
            DataConfig::Digits(_) => Some(Some([1, 8, 8])),
            DataConfig::Cifar10(_) | DataConfig::Cifar100(_) => Some(Some([3, 32, 32])),
            DataConfig::Idx(_) => Some(None),
            DataConfig::ImageFolder(f) => Some(Some([f.channels, f.size[0], f.size[1]])),
            DataConfig::Npz(n) => n.image.map(Some),
            DataConfig::Csv(c) => c.image.map(Some),
            _ => None,
        }
    }

    /// The number of features of each row, where the config alone tells it (generators, the
    /// built-in image sets, files with an `image` shape).
    pub fn row_width(&self) -> Option<usize> {
        match self {
            DataConfig::TwoMoons(_) => Some(2),
            DataConfig::Spurious(d) => Some(2 + d.noise_dims),
            DataConfig::Blobs(d) => Some(d.dim),
            _ => self.image_shape().flatten().map(|[c, h, w]| c * h * w),
        }
    }

    /// The number of classes, where the config alone tells it (files and IDX folders tell it
    /// when read).
    pub fn class_count(&self) -> Option<usize> {
        match self {
            DataConfig::TwoMoons(_) | DataConfig::Spurious(_) => Some(2),
            DataConfig::Blobs(d) => Some(d.classes),
            DataConfig::Digits(_) | DataConfig::Cifar10(_) => Some(10),
            DataConfig::Cifar100(_) => Some(100),
            DataConfig::Npz(_) | DataConfig::Csv(_) | DataConfig::Idx(_) | DataConfig::ImageFolder(_) => None,
        }
    }

    /// The size of the validation split.
    pub fn n_val(&self) -> usize {
        match self {
            DataConfig::TwoMoons(d) => d.n_val,
            DataConfig::Spurious(d) => d.n_val,
            DataConfig::Blobs(d) => d.n_val,
            DataConfig::Digits(d) => d.n_val,
            DataConfig::Npz(d) => d.n_val,
            DataConfig::Csv(d) => d.n_val,
            DataConfig::Cifar10(d) | DataConfig::Cifar100(d) | DataConfig::Idx(d) => d.n_val,
            DataConfig::ImageFolder(d) => d.n_val,
        }
    }

    /// Whether rows carry groups (for group metrics and group DRO), where the config alone
    /// tells: `None` for files, whose columns or arrays tell.
    pub fn has_groups(&self) -> Option<bool> {
        match self {
            DataConfig::Spurious(_) => Some(true),
            DataConfig::Npz(_) | DataConfig::Csv(_) => None,
            _ => Some(false),
        }
    }

    /// Whether rows are images (for `cnn`, `resnet18`, `wrn` and augmentation).
    pub fn is_image(&self) -> bool {
        match self {
            DataConfig::Digits(_)
            | DataConfig::Cifar10(_)
            | DataConfig::Cifar100(_)
            | DataConfig::Idx(_)
            | DataConfig::ImageFolder(_) => true,
            DataConfig::Npz(n) => n.image.is_some(),
            DataConfig::Csv(c) => c.image.is_some(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Digits {
    #[serde(default = "defaults::digits_val")]
    pub n_val: usize,
    #[serde(default = "defaults::digits_test")]
    pub n_test: usize,
    #[serde(default)]
    pub seed: u64,
}

/// Images in the digits set.
pub const DIGITS_TOTAL: usize = 1797;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TwoMoons {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    /// Standard deviation of the Gaussian noise added to each point.
    #[serde(default = "defaults::noise")]
    pub noise: f64,
    #[serde(default)]
    pub seed: u64,
}

/// Features: `[y' + core_noise·z₀, a' + spurious_noise·z₁, z₂, …]` with y' = 2y−1 and a' = 2a−1:
/// the core feature predicts the label reliably only with all its noise averaged out, while the
/// nearly noiseless spurious feature predicts it on the majority groups only.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spurious {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    /// P(attribute = label) in the training split; 0.9 makes the minority groups 10%.
    #[serde(default = "defaults::correlation")]
    pub correlation: f64,
    /// P(attribute = label) in validation and test; 0.5 makes every group equally common.
    #[serde(default = "defaults::eval_correlation")]
    pub eval_correlation: f64,
    #[serde(default = "defaults::core_noise")]
    pub core_noise: f64,
    #[serde(default = "defaults::spurious_noise")]
    pub spurious_noise: f64,
    /// Extra pure-noise features.
    #[serde(default)]
    pub noise_dims: usize,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Blobs {
    #[serde(default = "defaults::n_train")]
    pub n_train: usize,
    #[serde(default = "defaults::n_val")]
    pub n_val: usize,
    #[serde(default = "defaults::n_test")]
    pub n_test: usize,
    #[serde(default = "defaults::classes")]
    pub classes: usize,
    #[serde(default = "defaults::dim")]
    pub dim: usize,
    /// Standard deviation of each blob.
    #[serde(default = "defaults::spread")]
    pub spread: f64,
    #[serde(default)]
    pub seed: u64,
}

impl DataConfig {
    /// The checks of the data's own settings: ranges, and split sizes of at least 1.
    pub(crate) fn check(&self) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        let (n_train, n_test) = match self {
            DataConfig::TwoMoons(d) => {
                if !(d.noise >= 0.0 && d.noise.is_finite()) {
                    return err("data.noise", format!("must be a finite number ≥ 0, got {}", d.noise));
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Spurious(d) => {
                for (k, v) in [("correlation", d.correlation), ("eval_correlation", d.eval_correlation)] {
                    if !(0.0..=1.0).contains(&v) {
                        return err(&format!("data.{k}"), format!("is a probability, in [0, 1]; got {v}"));
                    }
                }
                for (k, v) in [("core_noise", d.core_noise), ("spurious_noise", d.spurious_noise)] {
                    if !(v >= 0.0 && v.is_finite()) {
                        return err(&format!("data.{k}"), format!("must be a finite number ≥ 0, got {v}"));
                    }
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Blobs(d) => {
                if d.classes < 2 {
                    return err("data.classes", format!("must be at least 2, got {}", d.classes));
                }
                if d.dim == 0 {
                    return err("data.dim", "must be at least 1".into());
                }
                if !(d.spread > 0.0 && d.spread.is_finite()) {
                    return err("data.spread", format!("must be a finite number > 0, got {}", d.spread));
                }
                (d.n_train, d.n_test)
            }
            DataConfig::Digits(d) => {
                if d.n_val + d.n_test >= DIGITS_TOTAL {
                    return err(
                        "data.n_test",
                        format!(
                            "is too large: n_val + n_test = {} leaves no training images of the {DIGITS_TOTAL}",
                            d.n_val + d.n_test
                        ),
                    );
                }
                (DIGITS_TOTAL - d.n_val - d.n_test, d.n_test)
            }
            // The file's row count is checked by the worker, which reads it.
            DataConfig::Npz(d) => (1, d.n_test),
            DataConfig::Csv(d) => (1, d.n_test),
            // Split sizes come from the files.
            DataConfig::Cifar10(_) | DataConfig::Cifar100(_) | DataConfig::Idx(_) => (1, 1),
            DataConfig::ImageFolder(f) => {
                if !matches!(f.channels, 1 | 3) {
                    return err("data.channels", format!("must be 3 (RGB) or 1 (grey), not {}", f.channels));
                }
                if f.size.contains(&0) || f.size.iter().any(|&d| d > 4096) {
                    return err("data.size", format!("[height, width] must each be 1 to 4096, not {:?}", f.size));
                }
                (1, 1)
            }
        };
        if n_train == 0 {
            return err("data.n_train", "must be at least 1".into());
        }
        if n_test == 0 {
            return err("data.n_test", "must be at least 1".into());
        }
        Ok(())
    }
}
