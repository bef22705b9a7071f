//! Pacing: the per-provider rate limit and the retry backoff. Pure timing
//! logic on tokio's clock, so tests run it on a paused clock.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Spaces calls at least `interval` apart (the provider's `rate`), in the
/// order they asked, however many tasks call at once.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: std::sync::Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter letting one call through every `interval` (zero: no limit).
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            next: std::sync::Mutex::new(None),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Waits for this call's turn.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        // Reserve a slot under the lock, wait outside it: callers queue by
        // slot time, and a cancelled waiter only wastes its own slot.
        let slot = {
            let now = Instant::now();
            let mut next = match self.next.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// When and how often to retry a call the cloud asked us to repeat
/// (429 Too Many Requests, 503 Service Unavailable) or could not reach.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay after the first failure; doubled after each further one.
    pub base_delay: Duration,
    /// Upper bound of the exponential delay.
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for: the call fails
    /// as transient and the caller's next pass tries again.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `failures + 1`, or `None` to give up.
    /// `retry_after` is the server's `Retry-After`, when it sent one.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if failures >= self.max_attempts {
            return None;
        }
        match retry_after {
            Some(d) if d > self.max_retry_after => None,
            Some(d) => Some(d),
            None => {
                let exp = failures.saturating_sub(1).min(20);
                Some(
                    self.base_delay
                        .saturating_mul(1u32 << exp)
                        .min(self.max_delay),
                )
            }
        }
    }
}

/// Reads a `Retry-After` header: delta seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_calls() {
        let rl = Arc::new(RateLimiter::new(Duration::from_secs(2)));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let rl = rl.clone();
            tasks.push(tokio::spawn(async move {
                rl.acquire().await;
                Instant::now() - t0
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        assert_eq!(
            times,
            [0, 2, 4, 6].map(Duration::from_secs).to_vec(),
            "one call every 2 s"
        );
        // after a quiet period the next call goes at once
        tokio::time::advance(Duration::from_secs(60)).await;
        let t1 = Instant::now();
        rl.acquire().await;
        assert_eq!(Instant::now(), t1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rate_never_waits() {
        let rl = RateLimiter::new(Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..100 {
            rl.acquire().await;
        }
        assert_eq!(Instant::now(), t0);
    }

    #[test]
    fn backoff_doubles_caps_and_gives_up() {
        let p = RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        };
        let d: Vec<_> = (1..=6).map(|f| p.delay(f, None)).collect();
        assert_eq!(
            d,
            vec![
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                Some(Duration::from_secs(5)),
                Some(Duration::from_secs(5)),
                None
            ]
        );
        // Retry-After wins over the exponential delay, up to the cap
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(p.delay(1, Some(Duration::from_secs(61))), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
