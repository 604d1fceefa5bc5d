//! Jittered exponential back-off.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt + 1`: `initial · 2^(attempt−1)`, capped at `max`, minus
    /// up to 25 % jitter so that restarted instances do not retry in lockstep.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)));
        let capped = exp.min(self.max);
        capped.mul_f64(rng.random_range(0.75..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let rng = &mut rand::rng();
        assert_eq!(b.delay(0, rng), Duration::ZERO);
        let d1 = b.delay(1, rng);
        assert!(d1 >= Duration::from_millis(75) && d1 <= Duration::from_millis(100));
        let d3 = b.delay(3, rng);
        assert!(d3 >= Duration::from_millis(300) && d3 <= Duration::from_millis(400));
        assert!(b.delay(30, rng) <= Duration::from_secs(1));
    }
}
