//! Statistics over seeds: the interquartile mean, a seeded BCa bootstrap interval of a mean, and
//! two paired tests (Student's paired t and Wilcoxon's signed-rank), each defined as scipy
//! defines it (`scipy.stats.trim_mean(x, 0.25)`, `scipy.stats.bootstrap(method="BCa")`,
//! `scipy.stats.ttest_rel`, `scipy.stats.wilcoxon` with its defaults) and checked against it.

use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// Resamples of a bootstrap interval.
pub const RESAMPLES: usize = 10_000;
/// The seed of every bootstrap interval xlab reports: the same data gives the same interval.
pub const BOOTSTRAP_SEED: u64 = 0x786c_6162; // "xlab"

/// SplitMix64: a small generator fixed here (not a crate's, whose stream may change between
/// versions), so an interval stays the same across xlab versions too.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; its bias is below 2⁻⁵⁰ for a few seeds).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [0, 1).
    #[cfg(test)]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    #[cfg(test)]
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn std_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("a standard normal")
}

/// The interquartile mean: the mean of the values left after cutting `⌊n/4⌋` from each end
/// (`scipy.stats.trim_mean(x, 0.25)`); robust to one diverged seed where the mean is not.
pub fn iqm(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let cut = xs.len() / 4;
    Some(mean(&v[cut..v.len() - cut]))
}

/// `np.percentile(sorted, q)` with linear interpolation; `sorted` is ascending.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

/// The 95% bias-corrected and accelerated (BCa) bootstrap interval of the mean of `xs`, from
/// `resamples` resamples drawn with `seed`. `None` below two values; one point when every value
/// is the same. BCa corrects the percentile interval for bias and skew (Efron 1987), as scipy's
/// default does; with few values every bootstrap interval is too narrow (the README measures how much).
pub fn bootstrap_ci(xs: &[f64], resamples: usize, seed: u64) -> Option<(f64, f64)> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let theta = mean(xs);
    if xs.iter().all(|x| *x == xs[0]) {
        return Some((theta, theta));
    }
    let mut rng = Rng::new(seed);
    let mut boot: Vec<f64> = (0..resamples).map(|_| (0..n).map(|_| xs[rng.below(n)]).sum::<f64>() / n as f64).collect();
    boot.sort_by(f64::total_cmp);
    // Bias: where the estimate falls in its bootstrap distribution (ties count half).
    let below = boot.partition_point(|b| *b < theta);
    let at_or_below = boot.partition_point(|b| *b <= theta);
    let norm = std_normal();
    let z0 = norm.inverse_cdf((below + at_or_below) as f64 / (2 * resamples) as f64);
    // Acceleration: the skew of the jackknife means.
    let total: f64 = xs.iter().sum();
    let jack: Vec<f64> = xs.iter().map(|x| (total - x) / (n - 1) as f64).collect();
    let jm = mean(&jack);
    let num: f64 = jack.iter().map(|j| (jm - j).powi(3)).sum();
    let den = 6.0 * jack.iter().map(|j| (jm - j).powi(2)).sum::<f64>().powf(1.5);
    let a = num / den;
    let adjust = |alpha: f64| {
        let z = norm.inverse_cdf(alpha);
        norm.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
    };
    Some((percentile(&boot, adjust(0.025)), percentile(&boot, adjust(0.975))))
}

/// A paired test's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Test {
    pub statistic: f64,
    /// Two-sided.
    pub p: f64,
}

/// Student's paired t test on the differences `d` (`scipy.stats.ttest_rel(x, y)` with
/// `d = x - y`): t = mean / (std / √n) at n − 1 degrees of freedom. `None` below two
/// differences or when they are all the same (no spread to test against).
pub fn paired_t(d: &[f64]) -> Option<Test> {
    let n = d.len();
    if n < 2 {
        return None;
    }
    let m = mean(d);
    let sd = (d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    if sd == 0.0 {
        return None;
    }
    let t = m / (sd / (n as f64).sqrt());
    let dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("n > 1 gives a valid t");
    Some(Test { statistic: t, p: (2.0 * dist.cdf(-t.abs())).min(1.0) })
}

/// Average ranks (1-based) of `a`, and whether any two tie.
fn ranks(a: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&i, &j| a[i].total_cmp(&a[j]));
    let mut r = vec![0.0; a.len()];
    let mut ties = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && a[order[j + 1]] == a[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        ties.push(j - i + 1);
        i = j + 1;
    }
    (r, ties)
}

/// The sum of the ranks of |d| over the positive differences, zeros dropped.
fn rank_sum_plus(d: &[f64]) -> (f64, f64, Vec<usize>) {
    let nonzero: Vec<f64> = d.iter().copied().filter(|x| *x != 0.0).collect();
    let (r, ties) = ranks(&nonzero.iter().map(|x| x.abs()).collect::<Vec<_>>());
    let plus = nonzero.iter().zip(&r).filter(|(x, _)| **x > 0.0).map(|(_, r)| r).sum();
    let minus = nonzero.iter().zip(&r).filter(|(x, _)| **x < 0.0).map(|(_, r)| r).sum();
    (plus, minus, ties)
}

/// Wilcoxon's signed-rank test on the differences `d`, as `scipy.stats.wilcoxon(d)` computes it
/// by default: zero differences dropped; without ties or zeros and at most 50 differences the
/// exact null distribution; with ties or zeros and at most 13, the exact sign-flip permutation
/// distribution; otherwise the normal approximation with the tie correction. The statistic is
/// the smaller of the positive and negative rank sums. `None` for no differences.
pub fn wilcoxon(d: &[f64]) -> Option<Test> {
    let n = d.len();
    if n == 0 {
        return None;
    }
    let (plus, minus, ties) = rank_sum_plus(d);
    let count = ties.iter().sum::<usize>();
    let has_ties = ties.iter().any(|t| *t > 1);
    let zeros = n - count;
    let statistic = plus.min(minus);
    let p = if !has_ties && zeros == 0 && n <= 50 {
        // P(T⁺ = k) over the 2ⁿ sign patterns: T⁺ is a sum of a subset of 1..n.
        let max = n * (n + 1) / 2;
        let mut ways = vec![0f64; max + 1];
        ways[0] = 1.0;
        for k in 1..=n {
            for s in (k..=max).rev() {
                ways[s] += ways[s - k];
            }
        }
        let all = 2f64.powi(n as i32);
        let t = plus.round() as usize;
        let cdf: f64 = ways[..=t].iter().sum::<f64>() / all;
        let sf: f64 = ways[t..].iter().sum::<f64>() / all;
        (2.0 * cdf.min(sf)).min(1.0)
    } else if n <= 13 {
        // Every sign flip of the differences, the observed one among them.
        let gamma = plus.abs() * f64::EPSILON * 100.0;
        let (mut le, mut ge) = (0usize, 0usize);
        let abs: Vec<f64> = d.iter().map(|x| x.abs()).collect();
        let mut flipped = vec![0.0; n];
        for mask in 0..(1u32 << n) {
            for (i, f) in flipped.iter_mut().enumerate() {
                *f = if mask >> i & 1 == 1 { -abs[i] } else { abs[i] };
            }
            let t = rank_sum_plus(&flipped).0;
            le += usize::from(t <= plus + gamma);
            ge += usize::from(t >= plus - gamma);
        }
        let all = (1u64 << n) as f64;
        (2.0 * (le as f64 / all).min(ge as f64 / all)).min(1.0)
    } else {
        let c = count as f64;
        let mn = c * (c + 1.0) * 0.25;
        let tie: f64 = ties.iter().map(|&t| (t as f64).powi(3) - t as f64).sum();
        let se = ((c * (c + 1.0) * (2.0 * c + 1.0) - tie / 2.0) / 24.0).sqrt();
        if se == 0.0 {
            return None;
        }
        let z = (plus - mn) / se;
        2.0 * std_normal().cdf(-z.abs())
    };
    Some(Test { statistic, p })
}

/// Whether a lower value of the metric is better, from its name (losses, errors, FID, NFE,
/// calibration error, times, sample distances): the direction `pareto(...)` assumes unless told
/// with `-`/`+`. The dashboard's scatter uses the same rule (`lowerIsBetter` in its app.js).
pub fn lower_is_better(metric: &str) -> bool {
    let m = metric.to_ascii_lowercase();
    ["loss", "ece", "error", "fid", "nfe", "time", "seconds", "passes", "swd", "mmd"].iter().any(|w| m.contains(w))
        || m.rsplit('.').next() == Some("fd")
        || m.ends_with("_s")
}

/// Which points are on the Pareto front: those no other point is at least as good as on both
/// coordinates and better on one. `higher`: per coordinate, whether higher is better. Points
/// missing a coordinate are not on the front.
pub fn pareto_front(points: &[Option<(f64, f64)>], higher: (bool, bool)) -> Vec<bool> {
    let better = |a: f64, b: f64, hi: bool| if hi { a > b } else { a < b };
    let dominates = |q: (f64, f64), p: (f64, f64)| {
        let ge = |a: f64, b: f64, hi: bool| a == b || better(a, b, hi);
        ge(q.0, p.0, higher.0) && ge(q.1, p.1, higher.1) && (better(q.0, p.0, higher.0) || better(q.1, p.1, higher.1))
    };
    points
        .iter()
        .map(|p| match p {
            None => false,
            Some(p) => !points.iter().flatten().any(|q| dominates(*q, *p)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iqm_cuts_a_quarter_from_each_end() {
        // scipy.stats.trim_mean([1, 2, 3, 4, 100, 6, 7, 8], 0.25) == 5.0 (cuts 2 each side)
        assert_eq!(iqm(&[1.0, 2.0, 3.0, 4.0, 100.0, 6.0, 7.0, 8.0]), Some(5.0));
        // n = 3 cuts nothing: the plain mean.
        assert_eq!(iqm(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(iqm(&[]), None);
    }

    #[test]
    fn ranks_average_over_ties() {
        let (r, ties) = ranks(&[3.0, 1.0, 3.0, 2.0]);
        assert_eq!(r, [3.5, 1.0, 3.5, 2.0]);
        assert_eq!(ties, [1, 1, 2]);
    }

    #[test]
    fn bootstrap_is_the_same_every_time_and_degenerate_cases_are_plain() {
        let xs = [0.91, 0.95, 0.97, 0.90, 0.93];
        assert_eq!(bootstrap_ci(&xs, 2000, 7), bootstrap_ci(&xs, 2000, 7));
        assert_ne!(bootstrap_ci(&xs, 2000, 7), bootstrap_ci(&xs, 2000, 8));
        assert_eq!(bootstrap_ci(&[0.5, 0.5, 0.5], 100, 1), Some((0.5, 0.5)));
        assert_eq!(bootstrap_ci(&[0.5], 100, 1), None);
    }

    #[test]
    fn pareto_front_respects_directions() {
        let pts = [Some((0.9, 0.5)), Some((0.8, 0.7)), Some((0.7, 0.4)), None, Some((0.9, 0.5))];
        assert_eq!(pareto_front(&pts, (true, true)), [true, true, false, false, true]);
        // Lower y is better: (0.7, 0.4) is now on the front, (0.8, 0.7) is not.
        assert_eq!(pareto_front(&pts, (true, false)), [true, false, true, false, true]);
    }

    /// scipy's answers on fixed data (runner/cli/tests/stats_scipy.py): the tests' statistics and
    /// p-values to 1e-9, the IQM exactly, and the BCa interval to Monte Carlo error.
    #[test]
    fn tests_and_intervals_match_scipy() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = std::env::var_os("XLAB_PYTHON").map_or_else(|| root.join("../../.venv/bin/python"), Into::into);
        let out = std::process::Command::new(&python)
            .arg(root.join("tests/stats_scipy.py"))
            .output()
            .unwrap_or_else(|e| panic!("{} runs (make setup): {e}", python.display()));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(cases.len(), 9);
        let pair = |v: &serde_json::Value| (v[0].as_f64().unwrap(), v[1].as_f64().unwrap());
        for c in &cases {
            let name = c["name"].as_str().unwrap();
            let d: Vec<f64> = c["d"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let close = |a: f64, b: f64, tol: f64, what: &str| {
                assert!((a - b).abs() <= tol * b.abs().max(1e-12), "{name}: {what} {a} vs scipy {b}")
            };
            let w = wilcoxon(&d).unwrap();
            let (ws, wp) = pair(&c["wilcoxon"]);
            close(w.statistic, ws, 1e-12, "wilcoxon statistic");
            close(w.p, wp, 1e-9, "wilcoxon p");
            let t = paired_t(&d).unwrap();
            let (ts, tp) = pair(&c["t"]);
            close(t.statistic, ts, 1e-9, "t statistic");
            close(t.p, tp, 1e-9, "t p");
            close(iqm(&d).unwrap(), c["iqm"].as_f64().unwrap(), 1e-12, "iqm");
            let (lo, hi) = bootstrap_ci(&d, 100_000, BOOTSTRAP_SEED).unwrap();
            let (slo, shi) = pair(&c["bca"]);
            // Monte Carlo error of a 2.5% quantile over 1e5 resamples: under 1% of the width on
            // continuous data; where the resample means take few values (5 seeds, or values
            // rounded to 0.01) the quantiles fall on neighbouring atoms, two at most.
            let discrete = d.len() <= 5 || name.contains("ties and zeros");
            let tol = if discrete { 0.05 } else { 0.01 } * (shi - slo);
            assert!(
                (lo - slo).abs() < tol && (hi - shi).abs() < tol,
                "{name}: BCa [{lo}, {hi}] vs scipy [{slo}, {shi}]"
            );
        }
    }

    /// How often the interval holds the true mean, over many synthetic data sets: near 95% at 20
    /// values, normal or skewed (BCa's point), and visibly short of it at 5 (what the docs say).
    #[test]
    fn bootstrap_interval_covers_the_true_mean() {
        let coverage = |n: usize, skewed: bool, seed: u64| {
            let mut rng = Rng::new(seed);
            let sets = 1000;
            let mut hit = 0;
            for s in 0..sets {
                // Exponential(1) has mean 1; the normal here has mean 0.
                let xs: Vec<f64> =
                    (0..n).map(|_| if skewed { -(1.0 - rng.unit()).ln() } else { rng.normal() }).collect();
                let (lo, hi) = bootstrap_ci(&xs, 2000, s).unwrap();
                let truth = if skewed { 1.0 } else { 0.0 };
                hit += usize::from(lo <= truth && truth <= hi);
            }
            hit as f64 / sets as f64
        };
        let (normal20, skewed20, normal5) = (coverage(20, false, 1), coverage(20, true, 2), coverage(5, false, 3));
        assert!((0.90..=0.97).contains(&normal20), "normal, 20 values: {normal20}");
        assert!((0.90..=0.97).contains(&skewed20), "exponential, 20 values: {skewed20}");
        assert!((0.75..=0.92).contains(&normal5), "normal, 5 values: {normal5}");
    }
}
