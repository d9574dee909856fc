//! The noise schedule of docs/bundle.md, in float64 as the Python reference computes it.

use crate::bundle::ScheduleSpec;

/// `alpha_bar[t]` for t = 0..T-1, with `alpha_bar[0] = 1` (t = 0 is clean).
#[derive(Debug, Clone)]
pub struct Schedule {
    alpha_bar: Vec<f64>,
}

impl Schedule {
    /// The linear schedule: `betas = linspace(beta_start, beta_end, T)` and
    /// `alpha_bar[t] = prod_{i < t} (1 - betas[i])`.
    pub fn linear(beta_start: f64, beta_end: f64, num_timesteps: usize) -> Schedule {
        let t = num_timesteps.max(2);
        let betas = linspace(beta_start, beta_end, t);
        let mut alpha_bar = Vec::with_capacity(t);
        let mut acc = 1.0f64;
        alpha_bar.push(1.0);
        for beta in betas.iter().take(t - 1) {
            acc *= 1.0 - beta;
            alpha_bar.push(acc);
        }
        Schedule { alpha_bar }
    }

    pub fn from_spec(spec: &ScheduleSpec) -> Schedule {
        Schedule::linear(spec.beta_start, spec.beta_end, spec.num_timesteps)
    }

    /// T, the number of timesteps; the sampler starts at T-1.
    pub fn num_timesteps(&self) -> usize {
        self.alpha_bar.len()
    }

    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alpha_bar[t.min(self.alpha_bar.len() - 1)]
    }

    /// The timestep stride for `steps` iterations: `max(1, ceil((T-1)/steps))`. The loop
    /// then runs `ceil((T-1)/stride)` iterations: `steps` for the usual values, fewer for
    /// some (60 runs 59; 85 to 90 all run 84).
    pub fn stride(&self, steps: usize) -> usize {
        let span = self.num_timesteps() - 1;
        span.div_ceil(steps.max(1)).max(1)
    }
}

/// numpy's `linspace`: `start + i * step`, with the last value exactly `stop`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = stop;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_match_the_released_code() {
        let s = Schedule::linear(1e-4, 0.02, 1000);
        assert_eq!(s.stride(34), 30);
        assert_eq!(s.stride(5), 200);
        assert_eq!(s.stride(10), 100);
        assert_eq!(s.stride(1000), 1);
        assert_eq!(s.stride(5000), 1);
    }

    #[test]
    fn alpha_bar_starts_clean_and_decreases() {
        let s = Schedule::linear(1e-4, 0.02, 1000);
        assert_eq!(s.alpha_bar(0), 1.0);
        assert!((s.alpha_bar(1) - (1.0 - 1e-4)).abs() < 1e-15);
        assert!(s.alpha_bar(999) < s.alpha_bar(500));
        assert!(s.alpha_bar(999) > 0.0);
    }
}
