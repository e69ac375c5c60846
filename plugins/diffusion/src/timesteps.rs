//! Timestep spacings shared by the samplers (docs/methods.md §3.2–3.4).

use serde::Deserialize;

/// How N inference timesteps are picked out of the T training timesteps.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// numpy's `round`: half to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The DDPM/DDIM timesteps for `n` steps out of `t` (diffusers' `set_timesteps`), descending.
pub fn ddim_timesteps(spacing: Spacing, t: usize, n: usize, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Leading => {
            let r = (t / n) as i64;
            (0..n as i64).rev().map(|i| i * r + offset).collect()
        }
        Spacing::Trailing => {
            // round(arange(T, 0, -T/N)) - 1
            let step = t as f64 / n as f64;
            let mut out = Vec::new();
            let mut v = t as f64;
            let mut i = 0;
            while v > 0.0 {
                out.push(round_half_even(v) as i64 - 1);
                i += 1;
                v = t as f64 - i as f64 * step;
            }
            out
        }
        Spacing::Linspace => {
            let last = (t - 1) as f64;
            (0..n)
                .rev()
                .map(|i| round_half_even(if n == 1 { 0.0 } else { last * i as f64 / (n - 1) as f64 }) as i64)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_for_t1000_n10() {
        assert_eq!(ddim_timesteps(Spacing::Leading, 1000, 10, 0), vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
        assert_eq!(
            ddim_timesteps(Spacing::Trailing, 1000, 10, 0),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            ddim_timesteps(Spacing::Linspace, 1000, 10, 0),
            vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
        assert_eq!(ddim_timesteps(Spacing::Leading, 1000, 10, 1)[0], 901);
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(round_half_even(499.5), 500.0);
        assert_eq!(round_half_even(498.5), 498.0);
        assert_eq!(round_half_even(-0.5), -0.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }
}
