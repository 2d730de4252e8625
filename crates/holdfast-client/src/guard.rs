//! [`LockGuard`]: a held lease, renewed in the background, with an at-risk and a lost signal.
//!
//! ## When is a lock "lost"?
//! The renewal task keeps a local deadline: the monotonic time at which the last successful
//! renewal (or the acquisition) *was sent*, plus the remaining TTL the server answered. The
//! server's expiry cannot be earlier than that (it answered after we sent), so until the
//! deadline the lock is certainly ours. The lock is declared [`LostReason`]:
//! - `NotFound` as soon as the server answers `lease_not_found` (expired, released by an
//!   admin, or forgotten by a memory-only server that restarted);
//! - `Revoked` when a renewal succeeds but the lease no longer holds one of the guard's keys
//!   (an admin force-released the key);
//! - `Expired` when the deadline passes without a successful renewal (server unreachable):
//!   the lease may live a little longer on the server, but we can no longer count on it.
//!
//! Between the first failed renewal and one of those, the guard is *at risk*.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use holdfast_api::{AddLocksRequest, LeaseResponse, LockRequest};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::ClientError;
use crate::schedule::Scheduled;

/// Why a lock is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// The server no longer knows the lease (expired, force-released, server state lost).
    NotFound,
    /// The lease lives, but these keys were taken from it (admin force release).
    Revoked(Vec<String>),
    /// No renewal succeeded before the local deadline (the server could not be reached).
    Expired,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::NotFound => write!(
                f,
                "the server no longer knows the lease (expired or force-released)"
            ),
            LostReason::Revoked(keys) => {
                write!(f, "force-released by an admin: {}", keys.join(", "))
            }
            LostReason::Expired => write!(
                f,
                "the lease expired: no renewal succeeded before its TTL ran out"
            ),
        }
    }
}

/// The state of a guard's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The last renewal succeeded.
    Held,
    /// Renewals are failing; the lease may still be alive until the deadline.
    AtRisk {
        /// Failed renewals in a row.
        failures: u32,
        /// The last failure.
        last_error: String,
    },
    /// The lock is certainly gone.
    Lost(LostReason),
    /// Released by its owner.
    Released,
}

/// What the renewal task publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Health.
    pub health: Health,
    /// Until when the lease is certainly alive (local monotonic clock).
    pub deadline: Instant,
}

/// The keys a guard holds with their fencing tokens, shared by the guard, its contexts and its
/// renewal task (keys added with [`LockGuard::add`] join it).
pub(crate) type SharedLocks = Arc<std::sync::Mutex<Vec<(String, u64)>>>;

fn read_locks(locks: &SharedLocks) -> Vec<(String, u64)> {
    locks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// An owned handle on a lease's status: lost/at-risk checks that can move into tasks.
#[derive(Debug, Clone)]
pub struct LockContext {
    lease_id: String,
    fencing_tokens: SharedLocks,
    status: watch::Receiver<LeaseStatus>,
}

impl LockContext {
    /// The lease id (the capability to renew and release: keep it secret).
    #[must_use]
    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// The fencing token of the first key.
    #[must_use]
    pub fn fencing_token(&self) -> u64 {
        read_locks(&self.fencing_tokens)
            .first()
            .map_or(0, |(_, t)| *t)
    }

    /// Every key with its fencing token, in the order they were asked for (keys added later
    /// at the end).
    #[must_use]
    pub fn fencing_tokens(&self) -> Vec<(String, u64)> {
        read_locks(&self.fencing_tokens)
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> LeaseStatus {
        self.status.borrow().clone()
    }

    /// True while renewals fail but the lease may still be alive.
    #[must_use]
    pub fn at_risk(&self) -> bool {
        matches!(self.status.borrow().health, Health::AtRisk { .. })
    }

    /// True once the lock is certainly gone.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        matches!(self.status.borrow().health, Health::Lost(_))
    }

    /// Resolves when the lock is certainly gone; never resolves if it is released normally.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let mut rx = self.status.clone();
        async move {
            loop {
                if let Health::Lost(reason) = &rx.borrow_and_update().health {
                    return reason.clone();
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// A receiver of every status change.
    #[must_use]
    pub fn watch(&self) -> watch::Receiver<LeaseStatus> {
        self.status.clone()
    }
}

/// A held lock (one lease, one or more keys). Renewed in the background every third of its
/// TTL; released by [`LockGuard::release`] or, best effort, when dropped inside a tokio runtime.
#[derive(Debug)]
pub struct LockGuard {
    client: Client,
    lease: LeaseResponse,
    held: SharedLocks,
    joined: bool,
    context: LockContext,
    status_tx: Arc<watch::Sender<LeaseStatus>>,
    renewal: Option<Scheduled>,
    done: bool,
}

impl LockGuard {
    /// Start renewing the lease `lease` (acquired by a request sent at `sent_at`). `keys` are
    /// the keys this guard asked for; `joined` tells that the grant joined an existing lease of
    /// the same holder (reentrancy), so releasing must decrement those keys, not end the lease.
    pub(crate) fn start(
        client: Client,
        lease: LeaseResponse,
        sent_at: Instant,
        keys: Vec<String>,
        joined: bool,
        renew_every: Option<Duration>,
    ) -> Self {
        let tokens: Vec<(String, u64)> = keys
            .into_iter()
            .map(|k| {
                let token = lease
                    .locks
                    .iter()
                    .find(|l| l.key == k)
                    .map_or(0, |l| l.fencing_token);
                (k, token)
            })
            .collect();
        let held: SharedLocks = Arc::new(std::sync::Mutex::new(tokens));
        let (renewal, status_tx, status) = schedule_renewal(
            client.clone(),
            lease.lease_id.clone(),
            &lease,
            sent_at,
            Arc::clone(&held),
            renew_every,
        );
        let context = LockContext {
            lease_id: lease.lease_id.clone(),
            fencing_tokens: Arc::clone(&held),
            status,
        };
        Self {
            client,
            lease,
            held,
            joined,
            context,
            status_tx,
            renewal: Some(renewal),
            done: false,
        }
    }

    /// The lease id.
    #[must_use]
    pub fn lease_id(&self) -> &str {
        &self.lease.lease_id
    }

    /// The fencing token of the first key (pass it to the storage you protect).
    #[must_use]
    pub fn fencing_token(&self) -> u64 {
        self.context.fencing_token()
    }

    /// Every key with its fencing token (keys added with [`LockGuard::add`] at the end).
    #[must_use]
    pub fn fencing_tokens(&self) -> Vec<(String, u64)> {
        self.context.fencing_tokens()
    }

    /// What a release takes: `Some(keys)`, each released once, for a guard that joined a
    /// lease; `None` (the whole lease, no key list built) otherwise.
    fn release_scope(&self) -> Option<Vec<String>> {
        self.joined
            .then(|| read_locks(&self.held).into_iter().map(|(k, _)| k).collect())
    }

    /// Add locks to this lease (incremental acquisition), waiting up to `wait` in the server's
    /// queue (split into several requests beyond the per-request limit). The server refuses
    /// with `Deadlock` at once if waiting would close a cycle (this request is the victim: it
    /// still holds what it held). Returns the new keys with their fencing tokens; releasing the
    /// guard releases them too.
    ///
    /// # Errors
    /// `Deadlock`, `Held` (no wait), `Timeout`, `LimitMismatch`, `LeaseNotFound`, ...
    pub async fn add(
        &self,
        locks: Vec<LockRequest>,
        wait: Duration,
    ) -> Result<Vec<(String, u64)>, ClientError> {
        let per_request_max = self.client.server_wait_max();
        let deadline = Instant::now() + wait;
        let lease = loop {
            let chunk = deadline
                .saturating_duration_since(Instant::now())
                .min(per_request_max);
            let request = AddLocksRequest {
                wait_ms: Some(crate::client::duration_ms(chunk)),
                locks: locks.clone(),
            };
            match self.client.add_locks(&self.lease.lease_id, &request).await {
                Ok(lease) => break lease,
                Err(ClientError::Timeout { .. })
                    if chunk == per_request_max
                        && deadline > Instant::now() + Duration::from_millis(1) => {}
                Err(e) => return Err(e),
            }
        };
        let added: Vec<(String, u64)> = locks
            .iter()
            .map(|l| {
                let token = lease
                    .locks
                    .iter()
                    .find(|h| h.key == l.key)
                    .map_or(0, |h| h.fencing_token);
                (l.key.clone(), token)
            })
            .collect();
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, token) in &added {
            if !held.iter().any(|(k, _)| k == key) {
                held.push((key.clone(), *token));
            }
        }
        Ok(added)
    }

    /// Add one exclusive lock (see [`LockGuard::add`]); returns its fencing token.
    ///
    /// # Errors
    /// As [`LockGuard::add`].
    pub async fn add_key(
        &self,
        key: impl Into<String>,
        wait: Duration,
    ) -> Result<u64, ClientError> {
        let added = self.add(vec![LockRequest::exclusive(key)], wait).await?;
        Ok(added.first().map_or(0, |(_, t)| *t))
    }

    /// The lease as granted.
    #[must_use]
    pub fn lease(&self) -> &LeaseResponse {
        &self.lease
    }

    /// True when the grant joined an existing lease of the same holder (reentrant).
    #[must_use]
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// An owned status handle (lost/at-risk), e.g. to move into a task.
    #[must_use]
    pub fn context(&self) -> LockContext {
        self.context.clone()
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> LeaseStatus {
        self.context.status()
    }

    /// True while renewals fail but the lease may still be alive.
    #[must_use]
    pub fn at_risk(&self) -> bool {
        self.context.at_risk()
    }

    /// True once the lock is certainly gone.
    #[must_use]
    pub fn is_lost(&self) -> bool {
        self.context.is_lost()
    }

    /// Resolves when the lock is certainly gone (see the module doc).
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.context.lost()
    }

    /// Stop renewing WITHOUT releasing: the lease lives until its TTL runs out unless someone
    /// renews or releases it by id (what `holdfast acquire` does). Returns the lease.
    #[must_use]
    pub fn detach(mut self) -> LeaseResponse {
        self.done = true;
        if let Some(renewal) = self.renewal.take() {
            renewal.cancel();
        }
        self.lease.clone()
    }

    /// Stop renewing and release the lock(s).
    ///
    /// # Errors
    /// `Lost` if the lock was already gone; transport errors (the lease then expires after its
    /// TTL).
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.done = true;
        if let Some(renewal) = self.renewal.take() {
            renewal.cancel();
        }
        let lost = match &self.status_tx.borrow().health {
            Health::Lost(reason) => Some(reason.clone()),
            _ => None,
        };
        mark_released(&self.status_tx);
        if let Some(reason) = lost {
            return Err(ClientError::Lost(reason));
        }
        release_lease(&self.client, &self.lease.lease_id, self.release_scope()).await
    }
}

/// Publish that the guard was released. When nobody but the guard's own context watches (no
/// clone of it, no `lost()` future), the value changes without a notification: waking the
/// watchers of a tokio `watch` takes its eight notifier locks even when nobody waits.
fn mark_released(tx: &watch::Sender<LeaseStatus>) {
    if tx.receiver_count() <= 1 {
        tx.send_if_modified(|s| {
            s.health = Health::Released;
            false
        });
    } else {
        tx.send_modify(|s| s.health = Health::Released);
    }
}

/// Release the whole lease (`joined_keys` is `None`), or once each key a joined guard took.
async fn release_lease(
    client: &Client,
    lease_id: &str,
    joined_keys: Option<Vec<String>>,
) -> Result<(), ClientError> {
    let result = if let Some(keys) = joined_keys {
        let mut out = Ok(());
        for key in keys {
            if let Err(e) = client.release_lock(lease_id, &key).await {
                out = Err(e);
            }
        }
        out
    } else {
        client.release_quietly(lease_id).await
    };
    match result {
        Err(ClientError::LeaseNotFound { .. }) => Err(ClientError::Lost(LostReason::NotFound)),
        other => other,
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.cancel();
        }
        if self.done {
            return;
        }
        mark_released(&self.status_tx);
        // Best effort: without a runtime the lease simply expires after its TTL.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let lease_id = self.lease.lease_id.clone();
            let scope = self.release_scope();
            handle.spawn(async move {
                if let Err(e) = release_lease(&client, &lease_id, scope).await {
                    tracing::debug!(error = %e, "release on drop failed; the lease expires after its TTL");
                }
            });
        }
    }
}

/// Schedule the renewals of a lease (its loop is spawned when the first renewal is due; see
/// `schedule`). Returns the scheduled entry (cancel it to stop renewing), the status sender
/// (shared with the guard, which marks a release) and a receiver.
pub(crate) fn schedule_renewal(
    client: Client,
    lease_id: String,
    lease: &LeaseResponse,
    sent_at: Instant,
    keys: SharedLocks,
    renew_every: Option<Duration>,
) -> (
    Scheduled,
    Arc<watch::Sender<LeaseStatus>>,
    watch::Receiver<LeaseStatus>,
) {
    let ttl = Duration::from_millis(lease.ttl_ms.max(1));
    let deadline = sent_at + Duration::from_millis(lease.remaining_ms);
    let (tx, rx) = watch::channel(LeaseStatus {
        health: Health::Held,
        deadline,
    });
    let tx = Arc::new(tx);
    let task_tx = Arc::clone(&tx);
    let interval = renew_every
        .unwrap_or(ttl / 3)
        .max(Duration::from_millis(10));
    // The acquisition may have waited: renew early if the certain part of the TTL is short.
    let first = deadline
        .checked_sub(ttl)
        .map_or_else(Instant::now, |start| start + interval);
    let scheduled = client.renewals().schedule(first, {
        let client = client.clone();
        Box::new(move || {
            Box::pin(renew_loop(
                client, lease_id, ttl, interval, keys, deadline, task_tx,
            ))
        })
    });
    (scheduled, tx, rx)
}

async fn renew_loop(
    client: Client,
    lease_id: String,
    ttl: Duration,
    interval: Duration,
    keys: SharedLocks,
    mut deadline: Instant,
    tx: Arc<watch::Sender<LeaseStatus>>,
) {
    let retry_every = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // Spawned when the first renewal is due.
    let mut next = Instant::now();
    let mut failures = 0u32;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        // Give up on a hanging renewal at the deadline (or after `retry_every` if already past).
        let give_up = deadline.max(sent + retry_every);
        let outcome = tokio::select! {
            r = client.renew(&lease_id, Some(ttl)) => Some(r),
            () = tokio::time::sleep_until(give_up) => None,
        };
        let error = match outcome {
            Some(Ok(lease)) => {
                let missing: Vec<String> = read_locks(&keys)
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| !lease.locks.iter().any(|l| &l.key == k))
                    .collect();
                if !missing.is_empty() {
                    tx.send_modify(|s| s.health = Health::Lost(LostReason::Revoked(missing)));
                    return;
                }
                failures = 0;
                deadline = sent + Duration::from_millis(lease.remaining_ms);
                tx.send_replace(LeaseStatus {
                    health: Health::Held,
                    deadline,
                });
                next = sent + interval;
                continue;
            }
            Some(Err(ClientError::LeaseNotFound { .. })) => {
                tx.send_modify(|s| s.health = Health::Lost(LostReason::NotFound));
                return;
            }
            Some(Err(e)) => e.to_string(),
            None => "renewal got no answer in time".to_owned(),
        };
        let now = Instant::now();
        if now >= deadline {
            tx.send_modify(|s| s.health = Health::Lost(LostReason::Expired));
            return;
        }
        failures += 1;
        tracing::warn!(failures, error = %error, "lease renewal failed; lock at risk");
        tx.send_replace(LeaseStatus {
            health: Health::AtRisk {
                failures,
                last_error: error,
            },
            deadline,
        });
        next = (now + retry_every).min(deadline);
    }
}
