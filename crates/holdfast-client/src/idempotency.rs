//! Run an operation once per idempotency key: the first caller executes it and stores its
//! result; duplicates get the stored result replayed; a duplicate arriving while the first is
//! still running waits (in the server's queue) and then gets the result. If the execution
//! fails, it is aborted so that a retry can run it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;
use holdfast_api::{IdempotencyBeginRequest, IdempotencyResultBody, IdempotencyStateName};
use tokio::time::Instant;

use crate::client::{Client, duration_ms};
use crate::error::ClientError;
use crate::guard::schedule_renewal;

/// Default time a duplicate waits for an in-progress twin.
pub const IDEMPOTENCY_WAIT_DEFAULT: Duration = Duration::from_secs(60);
/// Default TTL of the executor's lease (renewed while the closure runs).
pub const IDEMPOTENCY_EXECUTOR_TTL_DEFAULT: Duration = Duration::from_secs(30);

/// The result of an idempotent operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentOutcome {
    /// The stored (or just produced) result.
    pub result: IdempotencyResultBody,
    /// True if this call did not execute the operation but got its stored result.
    pub replayed: bool,
}

/// Builds an idempotent execution; finish with [`Idempotent::run`].
#[derive(Debug)]
#[must_use]
pub struct Idempotent {
    client: Client,
    key: String,
    fingerprint: String,
    holder: Option<String>,
    wait: Duration,
    ttl: Duration,
    record_ttl: Option<Duration>,
}

impl Idempotent {
    pub(crate) fn new(client: Client, key: String, fingerprint: String) -> Self {
        Self {
            client,
            key,
            fingerprint,
            holder: None,
            wait: IDEMPOTENCY_WAIT_DEFAULT,
            ttl: IDEMPOTENCY_EXECUTOR_TTL_DEFAULT,
            record_ttl: None,
        }
    }

    /// Executor name [default: the client's holder].
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// How long a duplicate waits for an in-progress twin [default: 60 s; longer waits loop].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// TTL of the executor lease, renewed while the operation runs [default: 30 s]. If the
    /// executor dies, the key frees itself after this.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long the result is kept for replay [default: the server's, 24 h].
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = Some(ttl);
        self
    }

    /// Run `operation` unless it already ran (or is running) for this key and fingerprint.
    ///
    /// # Errors
    /// `FingerprintMismatch` (same key, different request), `InProgress` (the twin still ran
    /// after the wait), transport errors, or the operation's own error (the execution is then
    /// aborted so a retry can run it).
    pub async fn run<E, F, Fut>(self, operation: F) -> Result<IdempotentOutcome, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IdempotencyResultBody, E>>,
        E: From<ClientError>,
    {
        let deadline = Instant::now() + self.wait;
        let holder = self
            .holder
            .clone()
            .unwrap_or_else(|| self.client.holder().to_owned());
        let (lease_id, lease, sent) = loop {
            let sent = Instant::now();
            let chunk = deadline
                .saturating_duration_since(sent)
                .min(self.client.server_wait_max());
            let request = IdempotencyBeginRequest {
                fingerprint: self.fingerprint.clone(),
                holder: holder.clone(),
                ttl_ms: Some(duration_ms(self.ttl)),
                record_ttl_ms: self.record_ttl.map(duration_ms),
                wait_ms: Some(duration_ms(chunk)),
            };
            match self.client.idempotency_begin(&self.key, &request).await {
                Ok(begun) => {
                    match begun.response.state {
                        IdempotencyStateName::Completed => {
                            let result =
                                begun.response.result.ok_or_else(|| ClientError::Server {
                                    status: 200,
                                    code: None,
                                    message: "completed idempotency record without a result".into(),
                                })?;
                            return Ok(IdempotentOutcome {
                                result,
                                replayed: true,
                            });
                        }
                        IdempotencyStateName::Started => {
                            let lease_id = begun.response.lease_id.clone().ok_or_else(|| {
                                ClientError::Server {
                                    status: 201,
                                    code: None,
                                    message: "started idempotency record without a lease id".into(),
                                }
                            })?;
                            break (lease_id, begun.response, sent);
                        }
                        IdempotencyStateName::InProgress => {}
                    }
                }
                Err(ClientError::InProgress { retry_after, .. }) if deadline > Instant::now() => {
                    // The server-side wait ran out (or was capped): wait again. If it
                    // answered before the wait was over, pause so as not to spin.
                    if sent.elapsed() + Duration::from_millis(5) < chunk {
                        let pause = retry_after
                            .unwrap_or(Duration::from_millis(50))
                            .min(Duration::from_millis(500));
                        tokio::time::sleep(
                            pause.min(deadline.saturating_duration_since(Instant::now())),
                        )
                        .await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if deadline <= Instant::now() {
                return Err(ClientError::InProgress {
                    key: self.key.clone(),
                    holder: None,
                    retry_after: None,
                }
                .into());
            }
        };
        // Keep the executor lease alive while the operation runs.
        let as_lease = holdfast_api::LeaseResponse {
            lease_id: lease_id.clone(),
            holder: holder.clone(),
            ttl_ms: duration_ms(self.ttl),
            expires_at_ms: lease.expires_at_ms.unwrap_or(0),
            remaining_ms: duration_ms(self.ttl),
            reason: None,
            metadata: None,
            locks: Vec::new(),
        };
        let (renewal, _tx, _rx) = schedule_renewal(
            self.client.clone(),
            lease_id.clone(),
            &as_lease,
            sent,
            std::sync::Arc::default(),
            None,
        );
        let outcome = AssertUnwindSafe(operation()).catch_unwind().await;
        renewal.cancel();
        match outcome {
            Ok(Ok(result)) => {
                self.client
                    .idempotency_complete(&self.key, &lease_id, result.clone())
                    .await?;
                Ok(IdempotentOutcome {
                    result,
                    replayed: false,
                })
            }
            Ok(Err(e)) => {
                if let Err(abort_err) = self.client.idempotency_abort(&self.key, &lease_id).await {
                    tracing::warn!(error = %abort_err, "idempotency abort failed; the key frees itself after the executor TTL");
                }
                Err(e)
            }
            Err(panic) => {
                let _ = self.client.idempotency_abort(&self.key, &lease_id).await;
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl Client {
    /// Prepare to run an operation once per `key` and `fingerprint` (see [`Idempotent`]).
    pub fn idempotency(
        &self,
        key: impl Into<String>,
        fingerprint: impl Into<String>,
    ) -> Idempotent {
        Idempotent::new(self.clone(), key.into(), fingerprint.into())
    }

    /// Run `operation` once per `key`/`fingerprint` with default options: duplicates get the
    /// stored result (`replayed: true`), an in-progress twin is waited for (up to 60 s).
    ///
    /// # Errors
    /// See [`Idempotent::run`].
    pub async fn idempotent<E, F, Fut>(
        &self,
        key: impl Into<String>,
        fingerprint: impl Into<String>,
        operation: F,
    ) -> Result<IdempotentOutcome, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IdempotencyResultBody, E>>,
        E: From<ClientError>,
    {
        self.idempotency(key, fingerprint).run(operation).await
    }
}
