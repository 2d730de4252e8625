//! Retry policy: bounded attempts, exponential backoff with full jitter, a cap per delay and a
//! bound on the total time; a zero initial delay means no-wait (one attempt).
//!
//! This mirrors holdfast-client's policy (seed 000's behaviour: 10 attempts, 30 s doubling, cap
//! 5 min) and adds `max_total`. Sleeping and randomness are injected ([`Sleeper`], any
//! [`rand::RngCore`]) so tests check the delays without wall time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};

/// How a delay is randomised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the backoff ceiling (deterministic).
    None,
    /// Uniform in `[0, ceiling]` ("full jitter"): spreads competing retriers the most.
    #[default]
    Full,
}

/// When and how often to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub attempts: u32,
    /// Ceiling of the first delay; zero means no-wait: one attempt, never sleeps.
    pub initial_delay: Duration,
    /// Growth of the ceiling per retry (at least 1).
    pub multiplier: f64,
    /// Cap of any one delay.
    pub max_delay: Duration,
    /// Bound on the whole loop: no retry starts if the time spent plus the next delay would
    /// exceed it. `None`: unbounded (only `attempts` bounds it).
    pub max_total: Option<Duration>,
    /// Randomisation of each delay under its ceiling.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// Seed 000's lock policy: 10 attempts, 30 s doubling, capped at 5 min, full jitter.
    fn default() -> Self {
        Self {
            attempts: 10,
            initial_delay: Duration::from_secs(30),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_total: None,
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no sleeping.
    #[must_use]
    pub fn no_wait() -> Self {
        Self {
            attempts: 1,
            initial_delay: Duration::ZERO,
            ..Self::default()
        }
    }

    /// `attempts` attempts starting at `initial_delay`, doubling, capped at 5 min, full jitter.
    #[must_use]
    pub fn new(attempts: u32, initial_delay: Duration) -> Self {
        Self {
            attempts,
            initial_delay,
            ..Self::default()
        }
    }

    /// The default for database transactions (deadlocks and serialization failures resolve in
    /// milliseconds): 5 attempts from 10 ms, doubling, capped at 1 s, at most 30 s in all.
    #[must_use]
    pub fn transaction_default() -> Self {
        Self {
            attempts: 5,
            initial_delay: Duration::from_millis(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(1),
            max_total: Some(Duration::from_secs(30)),
            jitter: Jitter::Full,
        }
    }

    /// Builder: set the total time bound.
    #[must_use]
    pub fn with_max_total(mut self, max_total: Duration) -> Self {
        self.max_total = Some(max_total);
        self
    }

    /// True when the policy never sleeps: a zero delay or a single attempt.
    #[must_use]
    pub fn is_no_wait(&self) -> bool {
        self.initial_delay.is_zero() || self.attempts <= 1
    }

    /// Attempts actually made at most: 1 in no-wait mode, else `attempts` (at least 1).
    #[must_use]
    pub fn effective_attempts(&self) -> u32 {
        if self.initial_delay.is_zero() {
            1
        } else {
            self.attempts.max(1)
        }
    }

    /// The ceiling of the delay after failed attempt number `retry + 1`:
    /// `min(max_delay, initial_delay * multiplier^retry)`.
    #[must_use]
    pub fn ceiling(&self, retry: u32) -> Duration {
        let initial = self.initial_delay.as_secs_f64();
        let factor = self
            .multiplier
            .max(1.0)
            .powi(i32::try_from(retry).unwrap_or(i32::MAX));
        let secs = initial * factor;
        let cap = self.max_delay.max(self.initial_delay);
        if !secs.is_finite() || secs >= cap.as_secs_f64() {
            cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay to sleep after failed attempt number `retry + 1`, drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut dyn RngCore) -> Duration {
        let ceiling = self.ceiling(retry);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => {
                let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(rng.random_range(0..=nanos))
            }
        }
    }
}

/// A boxed future that sleeps.
pub type SleepFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Something that sleeps: tokio in production, a recorder in tests.
pub trait Sleeper: Send + Sync + std::fmt::Debug {
    /// Sleep for `duration`.
    fn sleep(&self, duration: Duration) -> SleepFuture;
}

/// [`Sleeper`] backed by `tokio::time::sleep`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, duration: Duration) -> SleepFuture {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The default sleeper, shared.
#[must_use]
pub fn tokio_sleeper() -> Arc<dyn Sleeper> {
    Arc::new(TokioSleeper)
}

/// A fresh, `Send` random generator seeded from the OS (or from `seed`, for reproducible tests).
#[must_use]
pub fn make_rng(seed: Option<u64>) -> rand::rngs::StdRng {
    match seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_os_rng(),
    }
}

/// What an attempt reports when it did not succeed.
#[derive(Debug)]
pub enum AttemptOutcome<E> {
    /// The resource was busy / the attempt conflicted: try again after the policy's delay.
    Retry(E),
    /// Do not try again.
    Fatal(E),
}

/// Progress of a retry loop, reported before each sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryStep {
    /// The attempt that just failed (1-based).
    pub attempt: u32,
    /// Attempts allowed in all.
    pub attempts: u32,
    /// How long the loop now sleeps before attempt `attempt + 1`.
    pub delay: Duration,
}

/// Why a retry loop gave up.
#[derive(Debug)]
pub struct RetryFailure<E> {
    /// The last attempt's error.
    pub error: E,
    /// Attempts made.
    pub attempts: u32,
    /// True if the last error was retryable (attempts or total time ran out), false if fatal.
    pub exhausted: bool,
    /// Time spent in the loop.
    pub elapsed: Duration,
}

/// Run `attempt` (given the 1-based attempt number) until it succeeds, fails fatally, or the
/// policy has no attempt or time left; sleep between attempts with `sleeper`, drawing jitter from
/// `rng`, and tell `on_retry` before each sleep.
///
/// # Errors
/// The last error, with the number of attempts made and the time spent.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    sleeper: &dyn Sleeper,
    rng: &mut (dyn RngCore + Send),
    mut attempt: F,
    mut on_retry: impl FnMut(RetryStep),
) -> Result<T, RetryFailure<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, AttemptOutcome<E>>>,
{
    let attempts = policy.effective_attempts();
    let start = tokio::time::Instant::now();
    let mut n = 1;
    loop {
        match attempt(n).await {
            Ok(value) => return Ok(value),
            Err(AttemptOutcome::Fatal(error)) => {
                return Err(RetryFailure {
                    error,
                    attempts: n,
                    exhausted: false,
                    elapsed: start.elapsed(),
                });
            }
            Err(AttemptOutcome::Retry(error)) => {
                let elapsed = start.elapsed();
                if n >= attempts {
                    return Err(RetryFailure {
                        error,
                        attempts: n,
                        exhausted: true,
                        elapsed,
                    });
                }
                let delay = policy.delay(n - 1, rng);
                if let Some(max_total) = policy.max_total
                    && elapsed + delay > max_total
                {
                    return Err(RetryFailure {
                        error,
                        attempts: n,
                        exhausted: true,
                        elapsed,
                    });
                }
                on_retry(RetryStep {
                    attempt: n,
                    attempts,
                    delay,
                });
                sleeper.sleep(delay).await;
                n += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every requested sleep and returns at once.
    #[derive(Debug, Default, Clone)]
    struct RecordingSleeper(Arc<Mutex<Vec<Duration>>>);

    impl Sleeper for RecordingSleeper {
        fn sleep(&self, duration: Duration) -> SleepFuture {
            self.0.lock().unwrap().push(duration);
            Box::pin(async {})
        }
    }

    async fn always_retry(
        policy: &RetryPolicy,
        seed: u64,
    ) -> (Vec<Duration>, RetryFailure<&'static str>) {
        let sleeper = RecordingSleeper::default();
        let mut rng = make_rng(Some(seed));
        let r: Result<(), _> = retry(
            policy,
            &sleeper,
            &mut rng,
            |_| async { Err(AttemptOutcome::Retry("busy")) },
            |_| {},
        )
        .await;
        let sleeps = sleeper.0.lock().unwrap().clone();
        (sleeps, r.unwrap_err())
    }

    #[test]
    fn defaults_mirror_seed_000() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (0..7).map(|r| p.ceiling(r).as_secs()).collect();
        assert_eq!(secs, vec![30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
        assert_eq!(p.effective_attempts(), 10);
        let t = RetryPolicy::transaction_default();
        assert_eq!(t.attempts, 5);
        assert_eq!(t.ceiling(0), Duration::from_millis(10));
        assert_eq!(t.ceiling(3), Duration::from_millis(80));
    }

    #[tokio::test]
    async fn without_jitter_delays_are_the_ceilings() {
        let p = RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::new(5, Duration::from_millis(10))
        };
        let (sleeps, f) = always_retry(&p, 1).await;
        assert_eq!(f.attempts, 5);
        assert!(f.exhausted);
        let ms: Vec<u128> = sleeps.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![10, 20, 40, 80]);
    }

    #[tokio::test]
    async fn full_jitter_stays_under_the_ceiling() {
        let p = RetryPolicy::new(9, Duration::from_secs(30));
        for seed in 0..40 {
            let (sleeps, f) = always_retry(&p, seed).await;
            assert_eq!(f.attempts, 9);
            assert_eq!(sleeps.len(), 8, "no sleep after the last attempt");
            for (i, d) in sleeps.iter().enumerate() {
                assert!(*d <= p.ceiling(u32::try_from(i).unwrap()));
            }
        }
        // Full jitter actually varies.
        let (a, _) = always_retry(&p, 1).await;
        let (b, _) = always_retry(&p, 2).await;
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn zero_delay_is_no_wait() {
        let p = RetryPolicy::new(10, Duration::ZERO);
        assert!(p.is_no_wait());
        let (sleeps, f) = always_retry(&p, 3).await;
        assert_eq!((sleeps.len(), f.attempts), (0, 1));
        let (sleeps, f) = always_retry(&RetryPolicy::no_wait(), 3).await;
        assert_eq!((sleeps.len(), f.attempts), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn max_total_bounds_the_loop() {
        // Real (paused, auto-advancing) time so elapsed grows with each sleep.
        let p = RetryPolicy {
            jitter: Jitter::None,
            max_total: Some(Duration::from_millis(100)),
            ..RetryPolicy::new(100, Duration::from_millis(40))
        };
        let mut rng = make_rng(Some(1));
        let r: Result<(), _> = retry(
            &p,
            &TokioSleeper,
            &mut rng,
            |_| async { Err(AttemptOutcome::Retry("busy")) },
            |_| {},
        )
        .await;
        let f = r.unwrap_err();
        // 40 ms, then 80 ms would end at 120 ms > 100 ms: stop after attempt 2.
        assert_eq!(f.attempts, 2);
        assert!(f.exhausted);
    }

    #[tokio::test]
    async fn success_and_fatal() {
        let sleeper = RecordingSleeper::default();
        let mut rng = make_rng(Some(9));
        let p = RetryPolicy::new(10, Duration::from_millis(1));
        let r = retry(
            &p,
            &sleeper,
            &mut rng,
            |n| async move {
                if n < 3 {
                    Err(AttemptOutcome::Retry("busy"))
                } else {
                    Ok(n)
                }
            },
            |_| {},
        )
        .await;
        assert_eq!(r.unwrap(), 3);
        let r: Result<(), _> = retry(
            &p,
            &sleeper,
            &mut rng,
            |_| async { Err(AttemptOutcome::Fatal("no")) },
            |_| {},
        )
        .await;
        let f = r.unwrap_err();
        assert_eq!((f.attempts, f.exhausted, f.error), (1, false, "no"));
    }
}
