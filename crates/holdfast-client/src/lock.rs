//! [`LockBuilder`]: how to ask for a lock (keys, modes, holder, TTL, wait, retry policy), and
//! the acquisition loop behind [`LockBuilder::acquire`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use holdfast_api::{CreateLeaseRequest, HolderInfo, LockMode, LockRequest};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng as _};
use tokio::time::Instant;

use crate::client::{Client, duration_ms};
use crate::error::ClientError;
use crate::guard::{LockContext, LockGuard};
use crate::retry::{AttemptOutcome, RetryPolicy, Sleeper, TokioSleeper, retry};

/// Default lease TTL of the client (the server's default too).
pub const LOCK_TTL_DEFAULT: Duration = Duration::from_secs(30);

/// Reported to a progress callback while an acquisition waits: when an attempt found the key
/// held and queues (with a server-side wait), and before each sleep of the retry loop.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The key that was refused.
    pub key: String,
    /// Its holders at the refusal.
    pub holders: Vec<HolderInfo>,
    /// The current attempt (1-based).
    pub attempt: u32,
    /// Attempts allowed.
    pub attempts: u32,
    /// What happens now.
    pub phase: Phase,
    /// Time spent so far.
    pub waited: Duration,
}

/// What an acquisition does while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The attempt is queued in the server's FIFO queue for up to this long.
    Queued {
        /// The attempt's wait.
        wait: Duration,
    },
    /// The attempt failed; the next starts after this sleep.
    Sleeping {
        /// The sleep.
        next_retry_in: Duration,
    },
}

type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Builds a lock request; finish with [`LockBuilder::acquire`] or [`LockBuilder::with`].
///
/// Defaults: exclusive, TTL 30 s, no server-side wait, one attempt ([`RetryPolicy::no_wait`]),
/// not reentrant (two acquisitions in one process exclude each other even with the same
/// holder), holder from the client (`user@hostname:pid`).
#[must_use]
pub struct LockBuilder {
    client: Client,
    locks: Vec<LockRequest>,
    holder: Option<String>,
    ttl: Duration,
    wait: Duration,
    reason: Option<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    reentrant: bool,
    policy: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
    rng_seed: Option<u64>,
    progress: Option<ProgressFn>,
    renew_every: Option<Duration>,
}

impl std::fmt::Debug for LockBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockBuilder")
            .field("locks", &self.locks)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl LockBuilder {
    pub(crate) fn new(client: Client, key: String) -> Self {
        Self {
            client,
            locks: vec![LockRequest::exclusive(key)],
            holder: None,
            ttl: LOCK_TTL_DEFAULT,
            wait: Duration::ZERO,
            reason: None,
            metadata: None,
            reentrant: false,
            policy: RetryPolicy::no_wait(),
            sleeper: Arc::new(TokioSleeper),
            rng_seed: None,
            progress: None,
            renew_every: None,
        }
    }

    /// Who holds it (shown to others) [default: the client's holder].
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// Lease TTL (1 s ..= 30 days) [default: 30 s]; renewed every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Wait in the server's FIFO queue this long per attempt [default: 0, fail at once]. Waits
    /// over 60 s are split into several requests transparently.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Why (shown to others).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// JSON object attached to the lease (at most 4 KiB).
    pub fn metadata(mut self, metadata: serde_json::Map<String, serde_json::Value>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Take every key added so far in shared (readers) mode.
    pub fn shared(mut self) -> Self {
        for l in &mut self.locks {
            l.mode = Some(LockMode::Shared);
            l.limit = None;
            l.permits = None;
        }
        self
    }

    /// Take the first key as a semaphore of `limit` permits, holding `permits` of them.
    pub fn semaphore(mut self, limit: u32, permits: u32) -> Self {
        if let Some(l) = self.locks.first_mut() {
            l.mode = Some(LockMode::Semaphore);
            l.limit = Some(limit);
            l.permits = Some(permits);
        }
        self
    }

    /// Hold the keys back this long after an involuntary loss (lock-delay, ≤ 60 s).
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        for l in &mut self.locks {
            l.lock_delay_ms = Some(duration_ms(delay));
        }
        self
    }

    /// Also take `key` exclusively, atomically with the others.
    pub fn also(mut self, key: impl Into<String>) -> Self {
        self.locks.push(LockRequest::exclusive(key));
        self
    }

    /// Also take `key` in shared mode, atomically with the others.
    pub fn also_shared(mut self, key: impl Into<String>) -> Self {
        let mut l = LockRequest::exclusive(key);
        l.mode = Some(LockMode::Shared);
        self.locks.push(l);
        self
    }

    /// Also take a fully specified lock request.
    pub fn also_request(mut self, request: LockRequest) -> Self {
        self.locks.push(request);
        self
    }

    /// Let a holder that already holds a key join its own grant [default: false].
    pub fn reentrant(mut self, reentrant: bool) -> Self {
        self.reentrant = reentrant;
        self
    }

    /// Retry policy between attempts [default: one attempt].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sleeper used between attempts (tests inject one that records instead of sleeping).
    pub fn sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    /// Seed of the jitter RNG [default: from the OS].
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.rng_seed = Some(seed);
        self
    }

    /// Called before each sleep of the retry loop (who holds the key, next retry).
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Renew this often instead of every third of the TTL.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// The request body of one attempt, with its server-side wait.
    fn request(&self, wait: Duration) -> CreateLeaseRequest {
        CreateLeaseRequest {
            holder: self
                .holder
                .clone()
                .unwrap_or_else(|| self.client.holder().to_owned()),
            ttl_ms: Some(duration_ms(self.ttl)),
            wait_ms: Some(duration_ms(wait)),
            reason: self.reason.clone(),
            metadata: self.metadata.clone(),
            reentrant: Some(self.reentrant),
            locks: self.locks.clone(),
        }
    }

    /// One attempt: a request waiting up to `self.wait`, repeated while the wait is longer
    /// than one request may wait. Returns the lease and when its request was sent.
    async fn attempt(
        &self,
        attempt: u32,
        started: Instant,
    ) -> Result<(holdfast_api::LeaseResponse, Instant), ClientError> {
        if let (false, Some(progress)) = (self.wait.is_zero(), &self.progress) {
            // Ask without waiting first, so the caller can show who holds the key while this
            // attempt waits in the queue.
            let sent = Instant::now();
            match self
                .client
                .create_lease(&self.request(Duration::ZERO))
                .await
            {
                Ok(lease) => return Ok((lease, sent)),
                Err(ClientError::Held { key, holders, .. }) => progress(&Progress {
                    key,
                    holders,
                    attempt,
                    attempts: self.policy.effective_attempts(),
                    phase: Phase::Queued { wait: self.wait },
                    waited: started.elapsed(),
                }),
                Err(e) => return Err(e),
            }
        }
        let per_request_max = self.client.server_wait_max();
        let deadline = Instant::now() + self.wait;
        loop {
            let sent = Instant::now();
            let chunk = deadline
                .saturating_duration_since(sent)
                .min(per_request_max);
            match self.client.create_lease(&self.request(chunk)).await {
                Ok(lease) => return Ok((lease, sent)),
                Err(ClientError::Timeout { .. })
                    if chunk == per_request_max
                        && deadline > Instant::now() + Duration::from_millis(1) =>
                {
                    // Only the per-request limit ran out: queue again for the rest.
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Acquire all the keys (atomically), retrying by the policy; the guard renews the lease
    /// until it is released or dropped. Dropping this future abandons the wait: the in-flight
    /// request is disconnected and the server removes it from the queue.
    ///
    /// # Errors
    /// `Held` (single attempt refused), `Timeout` (all attempts failed: holders, attempts,
    /// time waited), `Deadlock`, `Invalid`, `Unauthorized`, `Forbidden`, `Unreachable`, ...
    pub async fn acquire(self) -> Result<LockGuard, ClientError> {
        let started = Instant::now();
        let first_key = self
            .locks
            .first()
            .map(|l| l.key.clone())
            .unwrap_or_default();
        let mut rng = LazyRng {
            seed: self.rng_seed,
            rng: None,
        };
        let last_busy: Mutex<(String, Vec<HolderInfo>)> =
            Mutex::new((first_key.clone(), Vec::new()));
        let this = &self;
        let last_busy_ref = &last_busy;
        let result = retry(
            &self.policy,
            self.sleeper.as_ref(),
            &mut rng,
            |n| async move {
                this.attempt(n, started).await.map_err(|e| {
                    if let ClientError::Held { key, holders, .. }
                    | ClientError::Timeout { key, holders, .. } = &e
                    {
                        let mut last = last_busy_ref
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        last.0.clone_from(key);
                        last.1.clone_from(holders);
                    }
                    match e {
                        ClientError::Held { .. } | ClientError::Timeout { .. } => {
                            AttemptOutcome::Busy {
                                error: e,
                                min_delay: None,
                            }
                        }
                        ClientError::Overloaded { retry_after, .. } => AttemptOutcome::Busy {
                            error: e,
                            min_delay: retry_after,
                        },
                        e => AttemptOutcome::Fatal(e),
                    }
                })
            },
            |step| {
                if let Some(progress) = &self.progress {
                    let last = last_busy
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    progress(&Progress {
                        key: last.0.clone(),
                        holders: last.1.clone(),
                        attempt: step.attempt,
                        attempts: step.attempts,
                        phase: Phase::Sleeping {
                            next_retry_in: step.delay,
                        },
                        waited: started.elapsed(),
                    });
                }
            },
        )
        .await;
        match result {
            Ok((lease, sent)) => {
                let keys: Vec<String> = self.locks.iter().map(|l| l.key.clone()).collect();
                // A reentrant grant joined an existing lease if it holds more than we asked
                // for, or a count above one on our keys.
                let joined = lease
                    .locks
                    .iter()
                    .any(|l| !keys.contains(&l.key) || l.count > 1);
                Ok(LockGuard::start(
                    self.client.clone(),
                    lease,
                    sent,
                    keys,
                    joined,
                    self.renew_every,
                ))
            }
            Err(failure) => Err(match failure.error {
                ClientError::Held {
                    key,
                    holders,
                    delayed_until_ms,
                } if failure.attempts <= 1 => ClientError::Held {
                    key,
                    holders,
                    delayed_until_ms,
                },
                ClientError::Held { key, holders, .. }
                | ClientError::Timeout { key, holders, .. } => ClientError::Timeout {
                    key: if key.is_empty() { first_key } else { key },
                    holders,
                    attempts: failure.attempts,
                    waited: started.elapsed(),
                },
                e => e,
            }),
        }
    }

    /// Acquire, run `body` with the lock's [`LockContext`], and release on every exit path:
    /// success, error and panic (the panic resumes after the release). If the lock is lost
    /// while `body` runs, `body` is dropped (cancelled) and the result is
    /// `Err(ClientError::Lost(..).into())`: code past a lost lock must not keep running as if
    /// it held it.
    ///
    /// # Errors
    /// Acquisition errors, `Lost`, or the body's error.
    pub async fn with<T, E, F, Fut>(self, body: F) -> Result<T, E>
    where
        F: FnOnce(LockContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<ClientError>,
    {
        let guard = self.acquire().await?;
        let context = guard.context();
        let lost = guard.lost();
        let outcome = tokio::select! {
            r = AssertUnwindSafe(body(context)).catch_unwind() => r,
            reason = lost => {
                let _ = guard.release().await;
                return Err(ClientError::Lost(reason).into());
            }
        };
        // The body finished while the lock was held: a failed release (the lease then
        // expires after its TTL) does not turn its outcome into an error.
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "release after with_lock body failed");
        }
        match outcome {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The retry jitter's generator, seeded when a retry first draws from it: most acquisitions
/// succeed at their first attempt, and seeding a `StdRng` (a ChaCha block) on every one was
/// about 1 % of an uncontended acquire+release on the client.
struct LazyRng {
    /// `LockBuilder::rng_seed`, for reproducible jitter in tests.
    seed: Option<u64>,
    rng: Option<StdRng>,
}

impl LazyRng {
    fn get(&mut self) -> &mut StdRng {
        let seed = self.seed;
        self.rng.get_or_insert_with(|| match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            // Seeded from the thread's generator, not the OS: `from_os_rng` is a getrandom
            // syscall (visible in the W1 client profile when it ran on every acquisition).
            None => StdRng::from_rng(&mut rand::rng()),
        })
    }
}

impl RngCore for LazyRng {
    fn next_u32(&mut self) -> u32 {
        self.get().next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.get().next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.get().fill_bytes(dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jitter_generator_is_seeded_at_its_first_draw_and_a_seed_is_kept() {
        let mut lazy = LazyRng {
            seed: Some(7),
            rng: None,
        };
        assert!(lazy.rng.is_none(), "nothing drawn, nothing seeded");
        let mut plain = StdRng::seed_from_u64(7);
        assert_eq!(lazy.next_u64(), plain.next_u64());
        assert_eq!(lazy.next_u32(), plain.next_u32());
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        lazy.fill_bytes(&mut a);
        plain.fill_bytes(&mut b);
        assert_eq!(a, b);

        // Unseeded generators differ from each other once they draw.
        let mut x = LazyRng {
            seed: None,
            rng: None,
        };
        let mut y = LazyRng {
            seed: None,
            rng: None,
        };
        assert_ne!((x.next_u64(), x.next_u64()), (y.next_u64(), y.next_u64()));
    }
}
