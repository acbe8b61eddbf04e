use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::{duration_ms, opt_duration_ms};

/// When and how often a failed attempt is tried again.
///
/// The delay before retry *n* (from 1) is
/// `min(retry_delay × backoff^(n-1), max_delay)`, then spread by ± `jitter`
/// (a fraction: 0.2 draws uniformly within ±20 %) and capped at `max_delay`
/// again. Permanent errors are never retried, whatever the policy says.
///
/// ```
/// use std::time::Duration;
/// use orchestrix_proto::RetryPolicy;
///
/// let p = RetryPolicy::new().retries(3).retry_delay(Duration::from_millis(100)).backoff(2.0);
/// assert_eq!(p.base_delay(1), Duration::from_millis(100));
/// assert_eq!(p.base_delay(3), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Retries after the first attempt: at most `retries + 1` attempts.
    pub retries: u32,
    /// Delay before the first retry.
    #[serde(with = "duration_ms", rename = "retryDelayMs")]
    pub retry_delay: Duration,
    /// Factor applied to the delay after each retry (1.0: constant delay).
    pub backoff: f64,
    /// Upper bound of any delay.
    #[serde(with = "duration_ms", rename = "maxDelayMs")]
    pub max_delay: Duration,
    /// Random spread of each delay, as a fraction of it (0.0 to 1.0).
    pub jitter: f64,
    /// Give up once this much time has passed since the first attempt began,
    /// even with retries left.
    #[serde(with = "opt_duration_ms", rename = "maxDurationMs")]
    pub max_duration: Option<Duration>,
}

impl RetryPolicy {
    /// The most retries a policy may allow: more is a mistake, not a policy.
    pub const MAX_RETRIES: u32 = 100_000;
}

impl Default for RetryPolicy {
    /// No retries; if retries are set, 100 ms between them, constant.
    fn default() -> Self {
        RetryPolicy {
            retries: 0,
            retry_delay: Duration::from_millis(100),
            backoff: 1.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.0,
            max_duration: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy: a single attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// The default for compensations, which should try hard: 3 retries,
    /// 100 ms doubling up to 10 s.
    pub fn compensation_default() -> Self {
        RetryPolicy {
            retries: 3,
            retry_delay: Duration::from_millis(100),
            backoff: 2.0,
            max_delay: Duration::from_secs(10),
            ..Self::default()
        }
    }

    /// Sets the number of retries after the first attempt.
    #[must_use]
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Sets the delay before the first retry.
    #[must_use]
    pub fn retry_delay(mut self, d: Duration) -> Self {
        self.retry_delay = d;
        self
    }

    /// Sets the backoff factor (values below 1.0 are taken as 1.0).
    #[must_use]
    pub fn backoff(mut self, factor: f64) -> Self {
        self.backoff = if factor.is_finite() { factor.max(1.0) } else { 1.0 };
        self
    }

    /// Sets the upper bound of any delay.
    #[must_use]
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Sets the jitter fraction (clamped to 0.0 ..= 1.0).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { 0.0 };
        self
    }

    /// Sets the overall time limit for the attempts of one step.
    #[must_use]
    pub fn max_duration(mut self, d: Duration) -> Self {
        self.max_duration = Some(d);
        self
    }

    /// The delay before retry `n` (from 1), before jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let factor = if self.backoff.is_finite() { self.backoff.max(1.0) } else { 1.0 };
        let exp = retry.saturating_sub(1).min(1024) as i32;
        let secs = self.retry_delay.as_secs_f64() * factor.powi(exp);
        let max = self.max_delay.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// The delay before retry `n`, with jitter drawn from `rng`.
    pub fn delay_for(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base_delay(retry);
        let j = if self.jitter.is_finite() { self.jitter.clamp(0.0, 1.0) } else { 0.0 };
        if j == 0.0 {
            return base;
        }
        let spread = 1.0 + j * (rng.f64() * 2.0 - 1.0);
        Duration::from_secs_f64(base.as_secs_f64() * spread).min(self.max_delay)
    }

    /// Whether another attempt may follow `attempts` failed ones, when the
    /// first began `elapsed` ago and the next would wait `delay`.
    pub fn allows_retry(&self, attempts: u32, elapsed: Duration, delay: Duration) -> bool {
        attempts <= self.retries && self.max_duration.is_none_or(|max| elapsed + delay < max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_per_idea_in_the_quick_start_s_case() {
        let p = RetryPolicy::new().retries(3).retry_delay(Duration::from_millis(50));
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!((json["retries"].as_u64(), json["retryDelayMs"].as_u64()), (Some(3), Some(50)));
        let back: RetryPolicy =
            serde_json::from_str(r#"{"retries": 3, "retryDelayMs": 50}"#).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"retry_delay_ms": 50}"#).is_err());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::new()
            .retries(10)
            .retry_delay(Duration::from_millis(100))
            .backoff(3.0)
            .max_delay(Duration::from_secs(2));
        let delays: Vec<_> = (1..=5).map(|n| p.base_delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 300, 900, 2000, 2000]);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let p = RetryPolicy::new().retry_delay(Duration::from_millis(1000)).jitter(0.25);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = (u128::MAX, 0);
        for _ in 0..10_000 {
            let d = p.delay_for(1, &mut rng).as_millis();
            assert!((750..=1250).contains(&d), "{d}");
            seen = (seen.0.min(d), seen.1.max(d));
        }
        // It really spreads: both ends of the band are reached.
        assert!(seen.0 < 800 && seen.1 > 1200, "{seen:?}");
    }

    #[test]
    fn attempts_and_duration_limit_retries() {
        let p = RetryPolicy::new().retries(2);
        assert!(p.allows_retry(1, Duration::ZERO, Duration::ZERO));
        assert!(p.allows_retry(2, Duration::ZERO, Duration::ZERO));
        assert!(!p.allows_retry(3, Duration::ZERO, Duration::ZERO));
        let p = p.max_duration(Duration::from_secs(1));
        assert!(!p.allows_retry(1, Duration::from_millis(900), Duration::from_millis(100)));
    }

    #[test]
    fn nonsense_factors_are_tamed() {
        let p =
            RetryPolicy::new().retry_delay(Duration::from_millis(10)).backoff(f64::NAN).jitter(9.0);
        assert_eq!(p.base_delay(5), Duration::from_millis(10));
        let d = p.delay_for(1, &mut fastrand::Rng::with_seed(1));
        assert!(d <= Duration::from_millis(20));
    }
}
