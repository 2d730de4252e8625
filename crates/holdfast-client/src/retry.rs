//! The retry policy of lock acquisition (seed 000's behaviour, generalised): a number of
//! attempts, an initial delay that grows by a multiplier up to a cap, full jitter, and no-wait
//! when the delay is zero.
//!
//! Each attempt is one server request (which may itself wait in the server's FIFO queue for the
//! builder's `wait`); between attempts the policy sleeps. The sleeping and the randomness are
//! injected ([`Sleeper`], any [`rand::RngCore`]) so the policy is tested without wall time.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rand::{Rng, RngCore};

/// Default number of attempts (seed 000: `--lock-retry-attempts=10`).
pub const RETRY_ATTEMPTS_DEFAULT: u32 = 10;
/// Default first delay (seed 000: `--lock-retry-delay=30`).
pub const RETRY_INITIAL_DELAY_DEFAULT: Duration = Duration::from_secs(30);
/// Default growth factor between delays.
pub const RETRY_MULTIPLIER_DEFAULT: f64 = 2.0;
/// Default cap of one delay (seed 000: "caps at 5 minutes per attempt").
pub const RETRY_MAX_DELAY_DEFAULT: Duration = Duration::from_secs(300);

/// How a delay is randomised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly the backoff ceiling (deterministic; for tests and special cases).
    None,
    /// Uniform in `[0, ceiling]` ("full jitter"): spreads competing retriers the most.
    #[default]
    Full,
}

/// When and how often to try again after a refusal.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub attempts: u32,
    /// Ceiling of the first delay; zero means no-wait: one attempt, never sleeps.
    pub initial_delay: Duration,
    /// Growth of the ceiling per retry.
    pub multiplier: f64,
    /// Cap of any one delay.
    pub max_delay: Duration,
    /// Randomisation of each delay under its ceiling.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    /// 10 attempts, 30 s doubling, capped at 5 min, full jitter.
    fn default() -> Self {
        Self {
            attempts: RETRY_ATTEMPTS_DEFAULT,
            initial_delay: RETRY_INITIAL_DELAY_DEFAULT,
            multiplier: RETRY_MULTIPLIER_DEFAULT,
            max_delay: RETRY_MAX_DELAY_DEFAULT,
            jitter: Jitter::Full,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no sleeping: fail at once if the lock is held (after the server-side wait,
    /// if any).
    #[must_use]
    pub fn no_wait() -> Self {
        Self {
            attempts: 1,
            initial_delay: Duration::ZERO,
            ..Self::default()
        }
    }

    /// `attempts` attempts starting at `initial_delay`, with the default multiplier, cap and
    /// jitter.
    #[must_use]
    pub fn new(attempts: u32, initial_delay: Duration) -> Self {
        Self {
            attempts,
            initial_delay,
            ..Self::default()
        }
    }

    /// True when the policy never sleeps: a zero delay or a single attempt.
    #[must_use]
    pub fn is_no_wait(&self) -> bool {
        self.initial_delay.is_zero() || self.attempts <= 1
    }

    /// Attempts actually made: 1 in no-wait mode, else `attempts` (at least 1).
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

/// What an attempt reports when it did not succeed.
#[derive(Debug)]
pub enum AttemptOutcome<E> {
    /// The resource was busy: try again after the policy's delay (or at least `min_delay`,
    /// e.g. a server's `Retry-After`).
    Busy {
        /// The error to return if no attempt is left.
        error: E,
        /// A lower bound for the next delay.
        min_delay: Option<Duration>,
    },
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
    /// True if the error was busy (ran out of attempts), false if fatal.
    pub exhausted: bool,
}

/// Run `attempt` (given the 1-based attempt number) until it succeeds, fails fatally, or the
/// policy has no attempt left; sleep between attempts with `sleeper`, drawing jitter from
/// `rng`, and tell `on_retry` before each sleep.
///
/// # Errors
/// The last error, with the number of attempts made.
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
    let mut n = 1;
    loop {
        match attempt(n).await {
            Ok(value) => return Ok(value),
            Err(AttemptOutcome::Fatal(error)) => {
                return Err(RetryFailure {
                    error,
                    attempts: n,
                    exhausted: false,
                });
            }
            Err(AttemptOutcome::Busy { error, min_delay }) => {
                if n >= attempts {
                    return Err(RetryFailure {
                        error,
                        attempts: n,
                        exhausted: true,
                    });
                }
                let mut delay = policy.delay(n - 1, rng);
                if let Some(min) = min_delay {
                    delay = delay.max(min.min(policy.max_delay));
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
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::sync::{Arc, Mutex};

    /// Records every requested sleep and returns at once.
    #[derive(Debug, Default, Clone)]
    struct RecordingSleeper(Arc<Mutex<Vec<Duration>>>);

    impl Sleeper for RecordingSleeper {
        fn sleep(&self, duration: Duration) -> SleepFuture {
            self.0.lock().unwrap().push(duration);
            Box::pin(async {})
        }
    }

    impl RecordingSleeper {
        fn sleeps(&self) -> Vec<Duration> {
            self.0.lock().unwrap().clone()
        }
    }

    fn busy() -> AttemptOutcome<&'static str> {
        AttemptOutcome::Busy {
            error: "held",
            min_delay: None,
        }
    }

    async fn run_always_busy(
        policy: &RetryPolicy,
        seed: u64,
    ) -> (Vec<Duration>, u32, Vec<RetryStep>) {
        let sleeper = RecordingSleeper::default();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut steps = Vec::new();
        let calls = Mutex::new(0u32);
        let r: Result<(), _> = retry(
            policy,
            &sleeper,
            &mut rng,
            |_| {
                *calls.lock().unwrap() += 1;
                async { Err(busy()) }
            },
            |s| steps.push(s),
        )
        .await;
        let f = r.unwrap_err();
        assert!(f.exhausted);
        assert_eq!(f.attempts, *calls.lock().unwrap());
        (sleeper.sleeps(), f.attempts, steps)
    }

    #[test]
    fn ceilings_grow_by_the_multiplier_and_stop_at_the_cap() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (0..8).map(|r| p.ceiling(r).as_secs()).collect();
        assert_eq!(secs, vec![30, 60, 120, 240, 300, 300, 300, 300]);
        // Huge retry numbers saturate at the cap instead of overflowing.
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[tokio::test]
    async fn without_jitter_delays_are_the_ceilings() {
        let p = RetryPolicy {
            jitter: Jitter::None,
            ..RetryPolicy::new(6, Duration::from_secs(1))
        };
        let (sleeps, attempts, steps) = run_always_busy(&p, 1).await;
        assert_eq!(attempts, 6);
        let secs: Vec<u64> = sleeps.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16]);
        assert_eq!(steps.len(), 5);
        assert_eq!(
            steps[0],
            RetryStep {
                attempt: 1,
                attempts: 6,
                delay: Duration::from_secs(1)
            }
        );
    }

    #[tokio::test]
    async fn full_jitter_stays_within_zero_and_the_capped_ceiling() {
        let p = RetryPolicy::new(12, Duration::from_secs(30));
        for seed in 0..50 {
            let (sleeps, attempts, _) = run_always_busy(&p, seed).await;
            assert_eq!(attempts, 12);
            assert_eq!(sleeps.len(), 11, "no sleep after the last attempt");
            for (i, d) in sleeps.iter().enumerate() {
                let retry = u32::try_from(i).unwrap();
                assert!(*d <= p.ceiling(retry), "seed {seed} retry {i}: {d:?}");
                assert!(*d <= Duration::from_secs(300));
            }
        }
    }

    #[tokio::test]
    async fn jittered_delays_grow_on_average() {
        // Mean over many seeds of each retry's delay: increases until the cap.
        let p = RetryPolicy::new(7, Duration::from_secs(10));
        let mut sums = [0f64; 6];
        for seed in 0..400 {
            let (sleeps, _, _) = run_always_busy(&p, seed).await;
            for (s, d) in sums.iter_mut().zip(&sleeps) {
                *s += d.as_secs_f64();
            }
        }
        let means: Vec<f64> = sums.iter().map(|s| s / 400.0).collect();
        // Ceilings 10, 20, 40, 80, 160, 300: full-jitter means are about half.
        for (mean, ceiling) in means.iter().zip([10.0, 20.0, 40.0, 80.0, 160.0, 300.0]) {
            assert!(
                (mean - ceiling / 2.0).abs() < ceiling * 0.1,
                "means {means:?}"
            );
        }
        assert!(means.windows(2).all(|w| w[0] < w[1]), "means {means:?}");
    }

    #[tokio::test]
    async fn zero_delay_is_no_wait_single_attempt_never_sleeps() {
        let p = RetryPolicy::new(10, Duration::ZERO);
        assert!(p.is_no_wait());
        let (sleeps, attempts, steps) = run_always_busy(&p, 3).await;
        assert_eq!(attempts, 1);
        assert!(sleeps.is_empty());
        assert!(steps.is_empty());
        let (sleeps, attempts, _) = run_always_busy(&RetryPolicy::no_wait(), 3).await;
        assert_eq!((sleeps.len(), attempts), (0, 1));
    }

    #[tokio::test]
    async fn success_stops_the_loop_and_fatal_is_not_retried() {
        let sleeper = RecordingSleeper::default();
        let mut rng = StdRng::seed_from_u64(9);
        let p = RetryPolicy::new(10, Duration::from_secs(1));
        let r = retry(
            &p,
            &sleeper,
            &mut rng,
            |n| async move { if n < 3 { Err(busy()) } else { Ok(n) } },
            |_| {},
        )
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(sleeper.sleeps().len(), 2);

        let sleeper = RecordingSleeper::default();
        let r: Result<(), _> = retry(
            &p,
            &sleeper,
            &mut rng,
            |_| async { Err(AttemptOutcome::Fatal("denied")) },
            |_| {},
        )
        .await;
        let f = r.unwrap_err();
        assert_eq!((f.attempts, f.exhausted, f.error), (1, false, "denied"));
        assert!(sleeper.sleeps().is_empty());
    }

    #[tokio::test]
    async fn retry_after_is_a_floor_under_the_jitter() {
        let sleeper = RecordingSleeper::default();
        let mut rng = StdRng::seed_from_u64(5);
        let p = RetryPolicy::new(3, Duration::from_secs(1));
        let r: Result<(), _> = retry(
            &p,
            &sleeper,
            &mut rng,
            |_| async {
                Err(AttemptOutcome::Busy {
                    error: "overloaded",
                    min_delay: Some(Duration::from_secs(2)),
                })
            },
            |_| {},
        )
        .await;
        assert!(r.is_err());
        assert!(
            sleeper
                .sleeps()
                .iter()
                .all(|d| *d >= Duration::from_secs(2))
        );
    }
}
