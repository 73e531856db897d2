//! Limits on what one noisy peer can cost everyone else: log lines that
//! say how many like them were suppressed, and a token bucket that makes a
//! chatty device wait.

use std::time::Duration;

use tokio::time::Instant;

/// Lets a kind of log line through at most once per interval and counts
/// the ones held back, so the next line can say how many there were.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Each
/// message spends one; one that finds the bucket empty puts it in debt, and
/// the caller waits the debt off before taking the next.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate_per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: Instant::now(),
        }
    }

    /// Spends a token for a message already taken; `Err(wait)` when the
    /// bucket is in debt: nothing more before `wait` has passed.
    pub fn spend(&mut self) -> Result<(), Duration> {
        self.spend_n(1)
    }

    /// [`TokenBucket::spend`] for `n` messages at once.
    pub fn spend_n(&mut self, n: usize) -> Result<(), Duration> {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst) - n as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(-self.tokens / self.rate))
        }
    }

    /// Spends `n` tokens only if the bucket holds them, or is full (more
    /// than a burst is let through from a full bucket, leaving a debt);
    /// else spends nothing and says how long until it would.
    pub fn try_spend_n(&mut self, n: usize) -> Result<(), Duration> {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        let needed = (n as f64).min(self.burst);
        if self.tokens >= needed {
            self.tokens -= n as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_held_back_and_counted() {
        let mut t = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.allow(), Some(2));
        assert_eq!(t.allow(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(10, 3);
        for _ in 0..3 {
            assert_eq!(b.spend(), Ok(()));
        }
        // The fourth message puts it in debt: a tenth of a second to wait.
        let wait = b.spend().unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // From now on, one message per wait.
        for _ in 0..5 {
            tokio::time::advance(wait).await;
            let next = b.spend().unwrap_err();
            assert!((next.as_secs_f64() - 0.1).abs() < 1e-6, "{next:?}");
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..2 {
            assert_eq!(b.spend(), Ok(()));
        }
        assert!(b.spend().is_ok(), "the burst is saved up");
        assert!(b.spend().is_err(), "and no more than the burst");
    }
}
