//! The tree-structured Parzen estimator (TPE, Bergstra et al. 2011) as Optuna's `TPESampler`
//! (5.x) defines it with its defaults: multivariate kernels, γ(n) = min(⌈n/10⌉, 25), prior
//! weight 1, magic clip, no endpoints, 24 candidates, older trials of the "above" group ramped
//! down past 25, running trials counted among the "above" ones (constant liar), and the first
//! `startup` trials drawn at random.
//!
//! A suggestion is a pure function of the search space, the trials so far (in trial order, each
//! complete with its value, pruned with its last rung's value, or running) and a 32-bit seed:
//! [`suggest`] draws its random numbers from a Mersenne Twister seeded with it, exactly as a
//! fresh `TPESampler(seed=…)` asked about the same history would, so the two agree (the tests
//! check that against Optuna itself). xlab seeds each trial with [`trial_seed`] of the search's
//! seed and the trial's number: the same history always gives the same next point.

use std::cmp::Ordering;
use std::collections::HashMap;

/// One dimension of the search space. Values are in Optuna's internal representation: a float
/// or an integer as `f64`, a choice as the index of the chosen value.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Float { low: f64, high: f64, log: bool },
    Int { low: i64, high: i64 },
    Choice(usize),
}

/// What became of one earlier trial.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Complete(f64),
    /// Stopped early; the last rung (epoch) it reached and its value there, if any.
    Pruned(Option<(u64, f64)>),
    Running,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// One value per dimension, in the space's order.
    pub params: Vec<f64>,
    pub state: State,
}

/// Whether larger values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Minimize,
    Maximize,
}

/// The candidates drawn from the "below" estimator per suggestion.
pub const CANDIDATES: usize = 24;
const PRIOR_WEIGHT: f64 = 1.0;

/// The seed of trial `number` of a search seeded with `seed`.
pub fn trial_seed(seed: u64, number: u64) -> u32 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(number.wrapping_add(1));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// The next point: at random while fewer than `startup` trials are complete or pruned, then by
/// TPE. Dimensions must be in name order (Optuna orders its search space so).
pub fn suggest(space: &[Dim], history: &[Trial], direction: Direction, startup: usize, seed: u32) -> Vec<f64> {
    let finished = history.iter().filter(|t| t.state != State::Running).count();
    let mut rng = Mt19937::new(seed);
    if finished < startup || space.is_empty() {
        return space.iter().map(|d| random_value(d, &mut rng)).collect();
    }
    let (below, above) = split(history, gamma(finished), direction);
    let l = Parzen::new(space, &below, weights(below.len()));
    let g = Parzen::new(space, &above, weights(above.len()));
    let mut candidates = l.sample(&mut rng, CANDIDATES);
    let lb = l.log_pdf(&candidates);
    let la = g.log_pdf(&candidates);
    let mut best = 0;
    for i in 1..candidates.len() {
        // The first maximum, as numpy's argmax.
        if lb[i] - la[i] > lb[best] - la[best] {
            best = i;
        }
    }
    let mut point = candidates.swap_remove(best);
    for (v, d) in point.iter_mut().zip(space) {
        if let Dim::Int { .. } = d {
            *v = v.trunc();
        }
    }
    point
}

fn gamma(n: usize) -> usize {
    n.div_ceil(10).min(25)
}

/// Optuna's default weights of `n` observations in trial order: flat, but with more than 25
/// the older ones ramp up from 1/n.
fn weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    let ramp = n - 25;
    let mut w: Vec<f64> = (0..ramp)
        .map(|i| {
            if ramp == 1 {
                1.0 / n as f64
            } else {
                let (a, b) = (1.0 / n as f64, 1.0);
                // numpy's linspace: start + i·step, the last exactly `stop`.
                if i == ramp - 1 {
                    b
                } else {
                    a + i as f64 * ((b - a) / (ramp - 1) as f64)
                }
            }
        })
        .collect();
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// The best `n_below` finished trials (complete ones first, by value; then pruned ones, the
/// furthest first, by their last value) and the rest, running ones among the rest; each group
/// in trial order.
fn split(history: &[Trial], n_below: usize, direction: Direction) -> (Vec<&Trial>, Vec<&Trial>) {
    let sign = if direction == Direction::Maximize { -1.0 } else { 1.0 };
    let mut complete: Vec<usize> = Vec::new();
    let mut pruned: Vec<usize> = Vec::new();
    for (i, t) in history.iter().enumerate() {
        match t.state {
            State::Complete(_) => complete.push(i),
            State::Pruned(_) => pruned.push(i),
            State::Running => {}
        }
    }
    let value = |i: usize| match history[i].state {
        State::Complete(v) => v,
        _ => unreachable!(),
    };
    // The best first, ties in trial order; only the best `n_below` need ordering.
    let better = |a: &usize, b: &usize| {
        let (x, y) = (value(*a), value(*b));
        let by_value = if sign > 0.0 { x.partial_cmp(&y) } else { y.partial_cmp(&x) };
        by_value.unwrap_or(Ordering::Equal).then(a.cmp(b))
    };
    if n_below < complete.len() {
        complete.select_nth_unstable_by(n_below, better);
        complete[..n_below].sort_by(better);
    } else {
        complete.sort_by(better);
    }
    let score = |i: usize| -> (f64, f64) {
        match history[i].state {
            State::Pruned(Some((step, v))) => {
                if v.is_nan() {
                    (-(step as f64), f64::INFINITY)
                } else {
                    (-(step as f64), sign * v)
                }
            }
            _ => (1.0, 0.0),
        }
    };
    pruned.sort_by(|&a, &b| score(a).partial_cmp(&score(b)).unwrap_or(Ordering::Equal));
    let from_complete = n_below.min(complete.len());
    let from_pruned = (n_below - from_complete).min(pruned.len());
    let mut below: Vec<usize> = complete[..from_complete].iter().chain(&pruned[..from_pruned]).copied().collect();
    let below_set: std::collections::HashSet<usize> = below.iter().copied().collect();
    below.sort_unstable();
    let above: Vec<&Trial> = (0..history.len()).filter(|i| !below_set.contains(i)).map(|i| &history[i]).collect();
    (below.into_iter().map(|i| &history[i]).collect(), above)
}

/// A random value of `d` as Optuna's `RandomSampler` draws it.
fn random_value(d: &Dim, rng: &mut Mt19937) -> f64 {
    match *d {
        Dim::Float { low, high, log } => {
            if log {
                let v = uniform(rng, low.ln(), high.ln()).exp();
                if low == high {
                    v
                } else {
                    v.clamp(low, next_down(high))
                }
            } else {
                let v = uniform(rng, low, high);
                if low == high {
                    v
                } else {
                    v.min(next_down(high))
                }
            }
        }
        Dim::Int { low, high } => {
            let x = uniform(rng, low as f64 - 0.5, high as f64 + 0.5);
            let k = ((x - low as f64) + 0.5).floor() + low as f64;
            k.clamp(low as f64, high as f64)
        }
        Dim::Choice(n) => {
            // One-hot: the largest of n uniform draws (the first, on a tie).
            let draws: Vec<f64> = (0..n).map(|_| uniform(rng, 0.0, 1.0)).collect();
            let mut best = 0;
            for (i, v) in draws.iter().enumerate() {
                if *v > draws[best] {
                    best = i;
                }
            }
            best as f64
        }
    }
}

fn uniform(rng: &mut Mt19937, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.next_f64()
}

fn next_down(x: f64) -> f64 {
    x.next_down()
}

/// One dimension of a Parzen estimator: a kernel per observation and one for the prior.
enum Kernels {
    Choice {
        /// Per kernel, the probability of each choice (row-major, `choices` per kernel).
        weights: Vec<f64>,
        choices: usize,
    },
    Numeric {
        mu: Vec<f64>,
        sigma: Vec<f64>,
        /// The untransformed bounds (`low`, `high`), the step of an integer, and whether
        /// kernels live in log space.
        low: f64,
        high: f64,
        step: f64,
        log: bool,
    },
}

impl Kernels {
    /// Bounds in kernel space.
    fn adapted(&self) -> (f64, f64) {
        match *self {
            Kernels::Numeric { low, high, step, log, .. } => {
                let (a, b) = (low - step / 2.0, high + step / 2.0);
                if log {
                    (a.ln(), b.ln())
                } else {
                    (a, b)
                }
            }
            Kernels::Choice { .. } => unreachable!(),
        }
    }
}

struct Parzen {
    /// Mixture weights, one per kernel.
    weights: Vec<f64>,
    dims: Vec<Kernels>,
}

impl Parzen {
    fn new(space: &[Dim], trials: &[&Trial], w: Vec<f64>) -> Parzen {
        let n = trials.len();
        let mut weights = if n == 0 { vec![1.0] } else { w.into_iter().chain([PRIOR_WEIGHT]).collect() };
        let sum: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|x| *x /= sum);
        let dims = space
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let obs: Vec<f64> = trials.iter().map(|t| t.params[j]).collect();
                match *d {
                    Dim::Choice(c) => categorical(&obs, c),
                    Dim::Float { low, high, log } => numeric(&obs, low, high, 0.0, log),
                    Dim::Int { low, high } => numeric(&obs, low as f64, high as f64, 1.0, false),
                }
            })
            .collect();
        Parzen { weights, dims }
    }

    /// `size` points: a kernel per point by weight, then each dimension from that kernel.
    fn sample(&self, rng: &mut Mt19937, size: usize) -> Vec<Vec<f64>> {
        // numpy's choice with p: the cumulative weights, normalised, searched (side right).
        let mut cdf: Vec<f64> = self
            .weights
            .iter()
            .scan(0.0, |s, w| {
                *s += w;
                Some(*s)
            })
            .collect();
        let last = *cdf.last().expect("a mixture has kernels");
        cdf.iter_mut().for_each(|c| *c /= last);
        let active: Vec<usize> = (0..size)
            .map(|_| {
                let u = rng.next_f64();
                cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
            })
            .collect();
        let mut out = vec![vec![0.0; self.dims.len()]; size];
        for (j, d) in self.dims.iter().enumerate() {
            if let Kernels::Choice { weights, choices } = d {
                for (i, &k) in active.iter().enumerate() {
                    let q = rng.next_f64();
                    let mut cum = 0.0;
                    let row = &weights[k * choices..(k + 1) * choices];
                    let mut idx = 0;
                    for (c, p) in row.iter().enumerate() {
                        cum += p;
                        let cum = if c == row.len() - 1 { 1.0 } else { cum };
                        if cum < q {
                            idx += 1;
                        }
                    }
                    out[i][j] = idx as f64;
                }
            }
        }
        // The numeric dimensions' quantiles come in one batch, dimension by dimension.
        for (j, d) in self.dims.iter().enumerate() {
            if let Kernels::Numeric { mu, sigma, low, high, step, log } = d {
                let (al, ah) = d.adapted();
                for (i, &k) in active.iter().enumerate() {
                    let q = rng.next_f64();
                    let (m, s) = (mu[k], sigma[k]);
                    let mut x = truncnorm_ppf(q, (al - m) / s, (ah - m) / s) * s + m;
                    if *log {
                        x = x.exp();
                    }
                    if *step != 0.0 {
                        x = (low + ((x - low) / step).round_ties_even() * step).clamp(*low, *high);
                    }
                    out[i][j] = x;
                }
            }
        }
        out
    }

    /// The log density of each point: per kernel, its weight's log and each dimension's log
    /// density, summed over kernels in log space. What depends on a kernel alone (the mass of
    /// its truncation) is computed once, and an integer's cell mass once per distinct kernel.
    fn log_pdf(&self, xs: &[Vec<f64>]) -> Vec<f64> {
        let n = self.weights.len();
        let log_w: Vec<f64> = self.weights.iter().map(|w| w.ln()).collect();
        let mut acc = vec![log_w; xs.len()];
        for (j, d) in self.dims.iter().enumerate() {
            match d {
                Kernels::Choice { weights, choices } => {
                    // A kernel's choice probabilities take a few distinct values (all rows have
                    // the same sum): each one's log once.
                    let mut logs: Vec<(u64, f64)> = Vec::new();
                    let mut ln_of = |p: f64| match logs.iter().find(|(b, _)| *b == p.to_bits()) {
                        Some(&(_, l)) => l,
                        None => {
                            logs.push((p.to_bits(), p.ln()));
                            p.ln()
                        }
                    };
                    let ln: Vec<f64> = weights.iter().map(|&p| ln_of(p)).collect();
                    for (x, row) in xs.iter().zip(&mut acc) {
                        let c = x[j] as usize;
                        for (k, v) in row.iter_mut().enumerate() {
                            *v += ln[k * choices + c];
                        }
                    }
                }
                Kernels::Numeric { mu, sigma, step, log, .. } => {
                    let (al, ah) = d.adapted();
                    // Each kernel's truncation, standardised, and the log of its mass.
                    let bounds: Vec<(f64, f64)> =
                        mu.iter().zip(sigma).map(|(&m, &s)| ((al - m) / s, (ah - m) / s)).collect();
                    let mass: Vec<f64> = bounds.iter().map(|&(a, b)| log_gauss_mass(a, b)).collect();
                    if *step == 0.0 {
                        // Per kernel: 1/σ, and the log density's constant part.
                        let inv: Vec<f64> = sigma.iter().map(|s| 1.0 / s).collect();
                        let constant: Vec<f64> =
                            sigma.iter().zip(&mass).map(|(s, m)| -LOG_SQRT_2PI - m - s.ln()).collect();
                        for (x, row) in xs.iter().zip(&mut acc) {
                            let v = if *log { x[j].ln() } else { x[j] };
                            for k in 0..n {
                                let z = (v - mu[k]) * inv[k];
                                let (a, b) = bounds[k];
                                let inside = -(z * z) / 2.0 + constant[k];
                                row[k] += if z < a || z > b { f64::NEG_INFINITY } else { inside };
                            }
                        }
                    } else {
                        // Kernels that share a centre and a width share every cell's mass.
                        let mut unique: Vec<(f64, f64)> = Vec::new();
                        let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
                        let of: Vec<usize> = mu
                            .iter()
                            .zip(sigma)
                            .map(|(&m, &s)| {
                                *seen.entry((m.to_bits(), s.to_bits())).or_insert_with(|| {
                                    unique.push((m, s));
                                    unique.len() - 1
                                })
                            })
                            .collect();
                        for (x, row) in xs.iter().zip(&mut acc) {
                            let (l, r) = (x[j] - step / 2.0, x[j] + step / 2.0);
                            let (l, r) = if *log { (l.ln(), r.ln()) } else { (l, r) };
                            let cell: Vec<f64> =
                                unique.iter().map(|&(m, s)| log_gauss_mass((l - m) / s, (r - m) / s)).collect();
                            for k in 0..n {
                                row[k] += cell[of[k]] - mass[k];
                            }
                        }
                    }
                }
            }
        }
        acc.iter()
            .map(|per_kernel| {
                let max = per_kernel.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let max = if max == f64::NEG_INFINITY { 0.0 } else { max };
                // Terms below e⁻⁶⁰ of the largest cannot move the sum of even a million of them.
                per_kernel.iter().map(|v| v - max).filter(|d| *d > -60.0).map(f64::exp).sum::<f64>().ln() + max
            })
            .collect()
    }
}

fn categorical(obs: &[f64], choices: usize) -> Kernels {
    if obs.is_empty() {
        return Kernels::Choice { weights: vec![1.0 / choices as f64; choices], choices };
    }
    // A row per kernel: the prior's share of each choice, plus 1 on the observed one.
    let n_kernels = obs.len() + 1;
    let mut weights = vec![PRIOR_WEIGHT / n_kernels as f64; choices * n_kernels];
    for (k, &o) in obs.iter().enumerate() {
        weights[k * choices + o as usize] += 1.0;
    }
    for row in weights.chunks_mut(choices) {
        let s: f64 = row.iter().sum();
        if s != 0.0 {
            row.iter_mut().for_each(|v| *v /= s);
        }
    }
    Kernels::Choice { weights, choices }
}

fn numeric(obs: &[f64], low0: f64, high0: f64, step: f64, log: bool) -> Kernels {
    let (mut low, mut high) = (low0 - step / 2.0, high0 + step / 2.0);
    let mut mus: Vec<f64> = obs.to_vec();
    if log {
        mus.iter_mut().for_each(|m| *m = m.ln());
        low = low.ln();
        high = high.ln();
    }
    // Each kernel's bandwidth: the larger gap to its neighbours (the bounds at the ends), the
    // outermost ones' only to their inner neighbour.
    let mut order: Vec<usize> = (0..mus.len()).collect();
    order.sort_by(|&a, &b| mus[a].total_cmp(&mus[b]));
    let mut with_ends = Vec::with_capacity(mus.len() + 2);
    with_ends.push(low);
    with_ends.extend(order.iter().map(|&i| mus[i]));
    with_ends.push(high);
    let mut sorted_sigma: Vec<f64> = (1..with_ends.len() - 1)
        .map(|i| (with_ends[i] - with_ends[i - 1]).max(with_ends[i + 1] - with_ends[i]))
        .collect();
    if with_ends.len() >= 4 {
        let n = with_ends.len();
        sorted_sigma[0] = with_ends[2] - with_ends[1];
        let last = sorted_sigma.len() - 1;
        sorted_sigma[last] = with_ends[n - 2] - with_ends[n - 3];
    }
    let mut sigma = vec![0.0; mus.len()];
    for (pos, &i) in order.iter().enumerate() {
        sigma[i] = sorted_sigma[pos];
    }
    let max_sigma = high - low;
    let min_sigma = (high - low) / 100f64.min(1.0 + (obs.len() + 1) as f64);
    sigma.iter_mut().for_each(|s| *s = s.max(min_sigma).min(max_sigma));
    mus.push(0.5 * (low + high));
    sigma.push(high - low);
    Kernels::Numeric { mu: mus, sigma, low: low0, high: high0, step, log }
}

// The standard normal's mass and quantiles in log space, as Optuna computes them.

const LOG_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

fn ndtr(a: f64) -> f64 {
    let x = a / std::f64::consts::SQRT_2;
    if x < -std::f64::consts::FRAC_1_SQRT_2 {
        0.5 * libm::erfc(-x)
    } else if x < std::f64::consts::FRAC_1_SQRT_2 {
        0.5 + 0.5 * libm::erf(x)
    } else {
        1.0 - 0.5 * libm::erfc(x)
    }
}

fn log_ndtr(a: f64) -> f64 {
    if a > 6.0 {
        return -ndtr(-a);
    }
    if a > -20.0 {
        return ndtr(a).ln();
    }
    // The asymptotic series of the far left tail.
    let log_lhs = -0.5 * a * a - (-a).ln() - LOG_SQRT_2PI;
    let (mut last, mut rhs, mut numerator, mut denom) = (0.0f64, 1.0f64, 1.0f64, 1.0f64);
    let denom_cons = 1.0 / (a * a);
    let mut sign = 1.0;
    let mut i = 0.0;
    while (last - rhs).abs() > f64::EPSILON {
        i += 1.0;
        last = rhs;
        sign = -sign;
        denom *= denom_cons;
        numerator *= 2.0 * i - 1.0;
        rhs += sign * numerator * denom;
    }
    log_lhs + rhs.ln()
}

/// log(Φ(b) − Φ(a)).
fn log_gauss_mass(a: f64, b: f64) -> f64 {
    let left = |a: f64, b: f64| {
        let (lb, la) = (log_ndtr(b), log_ndtr(a));
        lb + (-(la - lb).exp()).ln_1p()
    };
    if b <= 0.0 {
        left(a, b)
    } else if a > 0.0 {
        left(-b, -a)
    } else {
        (-(0.5 + 0.5 * libm::erf(a / std::f64::consts::SQRT_2))
            - (0.5 + 0.5 * libm::erf(-b / std::f64::consts::SQRT_2)))
        .ln_1p()
    }
}

fn log_add_exp(x: f64, y: f64) -> f64 {
    if x == y {
        return x + std::f64::consts::LN_2;
    }
    let m = x.max(y);
    m + (-(x - y).abs()).exp().ln_1p()
}

/// x with log Φ(x) = y (Newton's method from Optuna's starting guess).
fn ndtri_exp(y: f64) -> f64 {
    let flipped = y > -1e-2;
    let z = if flipped { (-y.exp_m1()).ln() } else { y };
    let mut x = if z < -5.0 {
        -(-2.0 * (z + LOG_SQRT_2PI)).sqrt()
    } else {
        -(3f64.sqrt() / std::f64::consts::PI) * (-z).exp_m1().ln()
    };
    for _ in 0..100 {
        let l = log_ndtr(x);
        let log_pdf = -0.5 * x * x - LOG_SQRT_2PI;
        let dx = (l - z) * (l - log_pdf).exp();
        x -= dx;
        if dx.abs() < 1e-8 * x.abs() {
            break;
        }
    }
    if flipped {
        -x
    } else {
        x
    }
}

/// The quantile `q` of the standard normal truncated to [a, b].
fn truncnorm_ppf(q: f64, a: f64, b: f64) -> f64 {
    if a == b {
        return f64::NAN;
    }
    if q == 0.0 {
        return a;
    }
    if q == 1.0 {
        return b;
    }
    let log_mass = log_gauss_mass(a, b);
    if a < 0.0 {
        ndtri_exp(log_add_exp(log_ndtr(a), q.ln() + log_mass))
    } else {
        -ndtri_exp(log_add_exp(log_ndtr(-b), (-q).ln_1p() + log_mass))
    }
}

/// MT19937 seeded as numpy's `RandomState(seed)`, drawing doubles as its `random_sample`.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A double in [0, 1) from 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (a as f64 * 67_108_864.0 + b as f64) / 9_007_199_254_740_992.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mersenne_twister_matches_the_reference_sequence() {
        // The first outputs of MT19937 seeded with 5489 (its reference default).
        let mut mt = Mt19937::new(5489);
        let got: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(got, [3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    #[test]
    fn gamma_and_weights_are_optunas() {
        assert_eq!([gamma(1), gamma(10), gamma(11), gamma(300)], [1, 1, 2, 25]);
        let w = weights(27);
        assert_eq!(w.len(), 27);
        assert_eq!(w[0], 1.0 / 27.0);
        assert_eq!(w[1], 1.0);
        assert!(w[2..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn the_normal_mass_and_quantiles_invert_each_other() {
        for &(a, b) in &[(-1.0, 2.0), (0.5, 3.0), (-30.0, -25.0), (-3.0, -0.1)] {
            for &q in &[0.01, 0.3, 0.5, 0.97] {
                let x = truncnorm_ppf(q, a, b);
                assert!(x >= a && x <= b, "{x} in [{a}, {b}]");
                // The mass up to x is q of the whole.
                let got = (log_gauss_mass(a, x) - log_gauss_mass(a, b)).exp();
                assert!((got - q).abs() < 1e-9, "q {q} on [{a}, {b}]: {got}");
            }
        }
        // Φ(0) = ½ and the mass of the whole line is 1.
        assert!((log_ndtr(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!(log_gauss_mass(-40.0, 40.0).abs() < 1e-15);
    }

    #[test]
    fn startup_draws_at_random_then_tpe_moves_towards_the_best() {
        let space = [Dim::Float { low: 0.0, high: 1.0, log: false }];
        // The objective is best at 0.2: after the startup, suggestions cluster near it.
        let mut history = Vec::new();
        for n in 0..40u64 {
            let p = suggest(&space, &history, Direction::Minimize, 10, trial_seed(3, n));
            assert!((0.0..1.0).contains(&p[0]));
            history.push(Trial { params: p.clone(), state: State::Complete((p[0] - 0.2).powi(2)) });
        }
        let late: Vec<f64> = history[30..].iter().map(|t| (t.params[0] - 0.2).abs()).collect();
        let early: Vec<f64> = history[..10].iter().map(|t| (t.params[0] - 0.2).abs()).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(mean(&late) < mean(&early) / 2.0, "late {late:?} early {early:?}");
        // Same history, same seed: the same point.
        let a = suggest(&space, &history, Direction::Minimize, 10, 77);
        let b = suggest(&space, &history, Direction::Minimize, 10, 77);
        assert_eq!(a, b);
    }
}
