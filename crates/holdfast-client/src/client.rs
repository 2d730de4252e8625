//! [`Client`]: the connection to a holdfast server and one method per API call.
//!
//! Every request has an explicit timeout: `request_timeout` for ordinary calls, and the
//! server-side wait plus `request_timeout` for long-polls. Connections are pooled (HTTP/1.1
//! keep-alive) and proxies are never used (a lock service is reached directly).

use std::sync::Arc;
use std::time::Duration;

use holdfast_api::{
    AddLocksRequest, CreateLeaseRequest, ErrorBody, FencingCheckRequest, FencingCheckResponse,
    ForceReleaseRequest, ForceReleaseResponse, IdempotencyAbortRequest, IdempotencyBeginRequest,
    IdempotencyCompleteRequest, IdempotencyResponse, IdempotencyResultBody, LeaseResponse,
    LockList, LockState, RenewRequest, StatsResponse,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ClientError;
use crate::lock::LockBuilder;
use crate::wire::{Undo, Wire};
use holdfast_api::wire::{self as proto, Op};

/// Default server URL (the server's default listen address).
pub const SERVER_URL_DEFAULT: &str = "http://127.0.0.1:7390";
/// Default time a server has to answer an ordinary request (added to any server-side wait).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default time to establish a TCP connection.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Longest server-side wait of one request (the server's limit); longer waits are looped.
pub const SERVER_WAIT_MAX: Duration = Duration::from_secs(60);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Path-segment characters left as they are: RFC 3986 unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode a key for a URL path. `/` is kept (keys are namespaced with it) unless the
/// key has empty, `.` or `..` segments, which URL normalisation would collapse: then every
/// `/` is encoded too (the server decodes either form to the same key).
#[must_use]
pub fn encode_key(key: &str) -> String {
    let keep_slash = key
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != "..");
    if keep_slash {
        key.split('/')
            .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    } else {
        let encoded = utf8_percent_encode(key, SEGMENT).to_string();
        // A whole-key `.`/`..` would still be a dot segment: spell the dots out.
        if encoded == "." || encoded == ".." {
            encoded.replace('.', "%2E")
        } else {
            encoded
        }
    }
}

fn release_path(lease_id: &str) -> String {
    format!("/v1/leases/{}", encode_query(lease_id))
}

/// Encode a query parameter value.
fn encode_query(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    holder: Option<String>,
    server_wait_max: Duration,
    wire: Option<String>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            base_url: SERVER_URL_DEFAULT.to_owned(),
            token: None,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            holder: None,
            server_wait_max: SERVER_WAIT_MAX,
            wire: None,
        }
    }
}

impl ClientBuilder {
    /// Server URL, e.g. `http://127.0.0.1:7390` (the default).
    #[must_use]
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// Also speak the wire protocol to `addr` (`host:port`, the server's `--wire-listen`,
    /// by default the HTTP port + 1): leases are created, renewed and released over one
    /// persistent, multiplexed TCP connection instead of HTTP requests, which costs the
    /// server and the client several times less per call. Everything else still uses HTTP.
    #[must_use]
    pub fn wire(mut self, addr: impl Into<String>) -> Self {
        self.wire = Some(addr.into());
        self
    }

    /// [`ClientBuilder::wire`], if any.
    #[must_use]
    pub fn wire_opt(mut self, addr: Option<String>) -> Self {
        self.wire = addr;
        self
    }

    /// Bearer token sent with every request.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Bearer token, if any.
    #[must_use]
    pub fn token_opt(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Time the server has to answer (on top of any server-side wait) [default: 10 s].
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// TCP connect timeout [default: 5 s].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Default holder name of this client's locks (default: `user@hostname:pid`).
    #[must_use]
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// Longest server-side wait of one request [default: 60 s, the server's limit]; longer
    /// waits are split into several requests.
    #[must_use]
    pub fn server_wait_max(mut self, max: Duration) -> Self {
        self.server_wait_max = max.clamp(Duration::from_millis(1), SERVER_WAIT_MAX);
        self
    }

    /// Build the client.
    ///
    /// # Errors
    /// `Invalid` if the URL is not `http://...`/`https://...` or the HTTP client cannot be built.
    pub fn build(self) -> Result<Client, ClientError> {
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ClientError::Invalid {
                field: Some("server".into()),
                message: format!("server URL {base_url:?} must start with http:// or https://"),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Invalid {
                field: None,
                message: format!("cannot build HTTP client: {e}"),
            })?;
        if let Some(addr) = &self.wire
            && addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(ClientError::Invalid {
                field: Some("wire".into()),
                message: format!("wire address {addr:?} must be host:port"),
            });
        }
        let wire = self
            .wire
            .map(|addr| Wire::new(addr, self.token.clone(), self.connect_timeout));
        Ok(Client {
            inner: Arc::new(Inner {
                wire,
                http,
                base_url,
                token: self.token,
                request_timeout: self.request_timeout,
                server_wait_max: self.server_wait_max,
                holder: self.holder.unwrap_or_else(default_holder),
                renewals: crate::schedule::Scheduler::default(),
            }),
        })
    }
}

/// `user@hostname:pid`: unique per process, readable in listings.
#[must_use]
pub fn default_holder() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "user".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{user}@{host}:{}", std::process::id())
}

struct Inner {
    wire: Option<Wire>,
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    request_timeout: Duration,
    server_wait_max: Duration,
    holder: String,
    /// First renewals of this client's guards (see `schedule`).
    renewals: crate::schedule::Scheduler,
}

/// A holdfast client: cheap to clone (shares one connection pool).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base_url)
            .field("wire", &self.inner.wire.as_ref().map(Wire::addr))
            .field("holder", &self.inner.holder)
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A successful idempotency begin, with the replay header.
#[derive(Debug, Clone)]
pub struct IdempotencyBegun {
    /// The body.
    pub response: IdempotencyResponse,
    /// `Idempotent-Replayed: true` was present.
    pub replayed: bool,
}

impl Client {
    /// The queue of this client's guards' first renewals.
    pub(crate) fn renewals(&self) -> &crate::schedule::Scheduler {
        &self.inner.renewals
    }

    /// A client of `base_url` with default timeouts and no token.
    ///
    /// # Errors
    /// See [`ClientBuilder::build`].
    pub fn new(base_url: impl Into<String>) -> Result<Self, ClientError> {
        Self::builder().base_url(base_url).build()
    }

    /// Configure a client.
    #[must_use]
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The server URL (no trailing `/`).
    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Default holder of this client's locks.
    #[must_use]
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// The ordinary request timeout.
    #[must_use]
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Longest server-side wait of one request.
    #[must_use]
    pub fn server_wait_max(&self) -> Duration {
        self.inner.server_wait_max
    }

    /// Start building a lock on `key` (see [`LockBuilder`]).
    pub fn lock(&self, key: impl Into<String>) -> LockBuilder {
        LockBuilder::new(self.clone(), key.into())
    }

    /// Run `body` holding an exclusive lock on `key` (default options), releasing it on every
    /// exit path: success, error and panic (the panic is resumed after the release).
    ///
    /// # Errors
    /// Acquisition errors as `E::from(ClientError)`, or the body's error.
    pub async fn with_lock<T, E, F, Fut>(&self, key: impl Into<String>, body: F) -> Result<T, E>
    where
        F: FnOnce(crate::LockContext) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: From<ClientError>,
    {
        self.lock(key).with(body).await
    }

    /// The timeout of one call that may wait `wait` in the server.
    fn timeout(&self, wait: Duration) -> Duration {
        self.inner.request_timeout + wait
    }

    /// Open the connections now (an HTTP health check, and the wire handshake when the wire
    /// protocol is used), so that the first real call does not pay for connecting.
    ///
    /// # Errors
    /// `Unreachable` and what the handshake answers (`Unauthorized` for a bad token).
    pub async fn connect(&self) -> Result<(), ClientError> {
        self.health().await?;
        if let Some(w) = &self.inner.wire {
            let _: serde_json::Value = w
                .call(
                    Op::Ping,
                    &serde_json::json!({}),
                    Undo::Nothing,
                    false,
                    self.timeout(Duration::ZERO),
                )
                .await?;
        }
        Ok(())
    }

    /// The wire-protocol address, if this client uses it.
    #[must_use]
    pub fn wire_addr(&self) -> Option<&str> {
        self.inner.wire.as_ref().map(Wire::addr)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base_url)
    }

    /// Send one request; `extra_wait` is added to the timeout for long-polls.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&(dyn erased::Body + Sync)>,
        extra_wait: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let mut req = self
            .inner
            .http
            .request(method, &url)
            .timeout(self.inner.request_timeout + extra_wait);
        if let Some(token) = &self.inner.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            let bytes = body.to_json().map_err(|e| ClientError::Invalid {
                field: None,
                message: e.to_string(),
            })?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        let response = req.send().await.map_err(|e| transport_error(&url, &e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_from_response(response, &url).await)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(dyn erased::Body + Sync)>,
        extra_wait: Duration,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let response = self.send(method, path, body, extra_wait).await?;
        decode(response, &url).await
    }

    /// `POST /v1/leases`: one request (the server waits at most `wait_ms`, ≤ 60000).
    ///
    /// # Errors
    /// `Held`, `Timeout` (server-side wait ran out), `Invalid`, ...
    pub async fn create_lease(
        &self,
        request: &CreateLeaseRequest,
    ) -> Result<LeaseResponse, ClientError> {
        let wait = Duration::from_millis(request.wait_ms.unwrap_or(0));
        if let Some(w) = &self.inner.wire {
            return w.create_lease(request, self.timeout(wait)).await;
        }
        self.call(Method::POST, "/v1/leases", Some(request), wait)
            .await
    }

    /// `POST /v1/leases/{id}/locks`: add locks to a lease (deadlock-checked).
    ///
    /// # Errors
    /// `Deadlock`, `Held`, `Timeout`, `LeaseNotFound`, ...
    pub async fn add_locks(
        &self,
        lease_id: &str,
        request: &AddLocksRequest,
    ) -> Result<LeaseResponse, ClientError> {
        let wait = Duration::from_millis(request.wait_ms.unwrap_or(0));
        if let Some(w) = &self.inner.wire {
            let body = proto::AddLocks {
                lease_id: lease_id.to_owned(),
                wait_ms: request.wait_ms,
                locks: request.locks.clone(),
            };
            let keys = request.locks.iter().map(|l| l.key.clone()).collect();
            let undo = Undo::Locks(lease_id.to_owned(), keys);
            let waits = !wait.is_zero();
            return w
                .call(Op::AddLocks, &body, undo, waits, self.timeout(wait))
                .await;
        }
        let path = format!("/v1/leases/{}/locks", encode_query(lease_id));
        self.call(Method::POST, &path, Some(request), wait).await
    }

    /// `GET /v1/leases/{id}`.
    ///
    /// # Errors
    /// `LeaseNotFound`, ...
    pub async fn get_lease(&self, lease_id: &str) -> Result<LeaseResponse, ClientError> {
        if let Some(w) = &self.inner.wire {
            let body = proto::LeaseRef {
                lease_id: lease_id.to_owned(),
            };
            return w
                .call(
                    Op::GetLease,
                    &body,
                    Undo::Nothing,
                    false,
                    self.timeout(Duration::ZERO),
                )
                .await;
        }
        self.call(
            Method::GET,
            &format!("/v1/leases/{}", encode_query(lease_id)),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// `POST /v1/leases/{id}/renew` to `now + ttl` (or the lease's TTL).
    ///
    /// # Errors
    /// `LeaseNotFound` means the lock is lost.
    pub async fn renew(
        &self,
        lease_id: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseResponse, ClientError> {
        if let Some(w) = &self.inner.wire {
            let body = proto::Renew {
                lease_id: lease_id.to_owned(),
                ttl_ms: ttl.map(duration_ms),
            };
            return w
                .call(
                    Op::Renew,
                    &body,
                    Undo::Nothing,
                    false,
                    self.timeout(Duration::ZERO),
                )
                .await;
        }
        let body = RenewRequest {
            ttl_ms: ttl.map(duration_ms),
        };
        let path = format!("/v1/leases/{}/renew", encode_query(lease_id));
        self.call(Method::POST, &path, Some(&body), Duration::ZERO)
            .await
    }

    /// `DELETE /v1/leases/{id}`: release the lease and all its locks.
    ///
    /// # Errors
    /// `LeaseNotFound` if it was already gone.
    pub async fn release(&self, lease_id: &str) -> Result<LeaseResponse, ClientError> {
        if let Some(w) = &self.inner.wire {
            let body = proto::ReleaseLease {
                lease_id: lease_id.to_owned(),
                quiet: false,
            };
            return w
                .call(
                    Op::ReleaseLease,
                    &body,
                    Undo::Nothing,
                    false,
                    self.timeout(Duration::ZERO),
                )
                .await;
        }
        self.call(
            Method::DELETE,
            &release_path(lease_id),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// [`Client::release`] for a caller that only needs to know that it succeeded (a guard):
    /// the lease in the answer is not decoded.
    pub(crate) async fn release_quietly(&self, lease_id: &str) -> Result<(), ClientError> {
        if let Some(w) = &self.inner.wire {
            return w
                .release_quietly(lease_id, self.timeout(Duration::ZERO))
                .await;
        }
        self.call::<serde::de::IgnoredAny>(
            Method::DELETE,
            &release_path(lease_id),
            None,
            Duration::ZERO,
        )
        .await
        .map(|_| ())
    }

    /// `DELETE /v1/leases/{id}/locks/{key}`: release one lock (decrements a reentrant count).
    ///
    /// # Errors
    /// `LeaseNotFound`, `LockNotFound`.
    pub async fn release_lock(
        &self,
        lease_id: &str,
        key: &str,
    ) -> Result<LeaseResponse, ClientError> {
        if let Some(w) = &self.inner.wire {
            let body = proto::ReleaseLock {
                lease_id: lease_id.to_owned(),
                key: key.to_owned(),
            };
            return w
                .call(
                    Op::ReleaseLock,
                    &body,
                    Undo::Nothing,
                    false,
                    self.timeout(Duration::ZERO),
                )
                .await;
        }
        let path = format!(
            "/v1/leases/{}/locks/{}",
            encode_query(lease_id),
            encode_key(key)
        );
        self.call(Method::DELETE, &path, None, Duration::ZERO).await
    }

    /// `GET /v1/locks?prefix=&holder=`.
    ///
    /// # Errors
    /// Transport and auth errors.
    pub async fn list_locks(
        &self,
        prefix: Option<&str>,
        holder: Option<&str>,
    ) -> Result<LockList, ClientError> {
        let mut query = Vec::new();
        if let Some(p) = prefix {
            query.push(format!("prefix={}", encode_query(p)));
        }
        if let Some(h) = holder {
            query.push(format!("holder={}", encode_query(h)));
        }
        let path = if query.is_empty() {
            "/v1/locks".to_owned()
        } else {
            format!("/v1/locks?{}", query.join("&"))
        };
        self.call(Method::GET, &path, None, Duration::ZERO).await
    }

    /// `GET /v1/locks/{key}`: holders and waiters of one key (empty when free).
    ///
    /// # Errors
    /// Transport and auth errors.
    pub async fn lock_state(&self, key: &str) -> Result<LockState, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/locks/{}", encode_key(key)),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// Admin: `POST /v1/admin/locks/{key}/release` (force release a key).
    ///
    /// # Errors
    /// `Forbidden` for non-admins, `LockNotFound` if nobody holds it.
    pub async fn force_release_lock(
        &self,
        key: &str,
        reason: &str,
    ) -> Result<ForceReleaseResponse, ClientError> {
        let body = ForceReleaseRequest {
            reason: reason.to_owned(),
        };
        let path = format!("/v1/admin/locks/{}/release", encode_key(key));
        self.call(Method::POST, &path, Some(&body), Duration::ZERO)
            .await
    }

    /// Admin: `POST /v1/admin/leases/{id}/release` (force release a whole lease).
    ///
    /// # Errors
    /// `Forbidden` for non-admins, `LeaseNotFound`.
    pub async fn force_release_lease(
        &self,
        lease_id: &str,
        reason: &str,
    ) -> Result<ForceReleaseResponse, ClientError> {
        let body = ForceReleaseRequest {
            reason: reason.to_owned(),
        };
        let path = format!("/v1/admin/leases/{}/release", encode_query(lease_id));
        self.call(Method::POST, &path, Some(&body), Duration::ZERO)
            .await
    }

    /// `POST /v1/fencing/check`: is `fencing_token` the current grant of `key`?
    ///
    /// # Errors
    /// Transport and auth errors.
    pub async fn check_fencing(
        &self,
        key: &str,
        fencing_token: u64,
    ) -> Result<FencingCheckResponse, ClientError> {
        let body = FencingCheckRequest {
            key: key.to_owned(),
            fencing_token,
        };
        self.call(
            Method::POST,
            "/v1/fencing/check",
            Some(&body),
            Duration::ZERO,
        )
        .await
    }

    /// `GET /v1/stats`.
    ///
    /// # Errors
    /// Transport and auth errors.
    pub async fn stats(&self) -> Result<StatsResponse, ClientError> {
        self.call(Method::GET, "/v1/stats", None, Duration::ZERO)
            .await
    }

    /// `GET /healthz`: Ok when the server answers.
    ///
    /// # Errors
    /// `Unreachable` or a server error.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.send(Method::GET, "/healthz", None, Duration::ZERO)
            .await
            .map(|_| ())
    }

    /// `POST /v1/idempotency/{key}`: begin. `started` and `completed` are `Ok`;
    /// `in_progress` is `Err(InProgress)` (with the executor's name), a different fingerprint
    /// `Err(FingerprintMismatch)`.
    ///
    /// # Errors
    /// As described.
    pub async fn idempotency_begin(
        &self,
        key: &str,
        request: &IdempotencyBeginRequest,
    ) -> Result<IdempotencyBegun, ClientError> {
        let wait = Duration::from_millis(request.wait_ms.unwrap_or(0));
        let path = format!("/v1/idempotency/{}", encode_key(key));
        let url = self.url(&path);
        match self.send(Method::POST, &path, Some(request), wait).await {
            Ok(response) => {
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                let response = decode(response, &url).await?;
                Ok(IdempotencyBegun { response, replayed })
            }
            Err(ClientError::InProgress {
                key: k,
                holder: None,
                retry_after,
            }) => {
                // The holder is in the body's extra members; ask for the record to name it.
                let holder = self.idempotency_get(key).await.ok().and_then(|r| r.holder);
                Err(ClientError::InProgress {
                    key: k,
                    holder,
                    retry_after,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/idempotency/{key}`: store the result of the execution `lease_id` started.
    ///
    /// # Errors
    /// `IdempotencyNotFound` if the execution is no longer ours (its lease expired).
    pub async fn idempotency_complete(
        &self,
        key: &str,
        lease_id: &str,
        result: IdempotencyResultBody,
    ) -> Result<IdempotencyResponse, ClientError> {
        let body = IdempotencyCompleteRequest {
            lease_id: lease_id.to_owned(),
            result,
        };
        let path = format!("/v1/idempotency/{}", encode_key(key));
        self.call(Method::PUT, &path, Some(&body), Duration::ZERO)
            .await
    }

    /// `DELETE /v1/idempotency/{key}`: abandon the execution so a retry can run.
    ///
    /// # Errors
    /// `IdempotencyNotFound`.
    pub async fn idempotency_abort(&self, key: &str, lease_id: &str) -> Result<(), ClientError> {
        let body = IdempotencyAbortRequest {
            lease_id: lease_id.to_owned(),
        };
        let path = format!("/v1/idempotency/{}", encode_key(key));
        self.send(Method::DELETE, &path, Some(&body), Duration::ZERO)
            .await
            .map(|_| ())
    }

    /// `GET /v1/idempotency/{key}`.
    ///
    /// # Errors
    /// `IdempotencyNotFound`.
    pub async fn idempotency_get(&self, key: &str) -> Result<IdempotencyResponse, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/idempotency/{}", encode_key(key)),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// `GET /v1/events?prefix=`: the event stream (see [`crate::events::EventStream`]),
    /// resuming after `last_event_id` if given. No request timeout applies to the stream.
    ///
    /// # Errors
    /// Transport and auth errors at connect time.
    pub async fn events(
        &self,
        prefix: Option<&str>,
        last_event_id: Option<u64>,
    ) -> Result<crate::events::EventStream, ClientError> {
        let path = match prefix {
            Some(p) => format!("/v1/events?prefix={}", encode_query(p)),
            None => "/v1/events".to_owned(),
        };
        let url = self.url(&path);
        let mut req = self
            .inner
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(token) = &self.inner.token {
            req = req.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let response = req.send().await.map_err(|e| transport_error(&url, &e))?;
        if !response.status().is_success() {
            return Err(error_from_response(response, &url).await);
        }
        Ok(crate::events::EventStream::new(response))
    }
}

/// Milliseconds of a duration, saturating.
#[must_use]
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn transport_error(url: &str, e: &reqwest::Error) -> ClientError {
    let what = if e.is_timeout() {
        "no answer in time".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    // reqwest's Display hides the cause (connection refused, ...): walk the sources.
    let mut message = what;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    ClientError::Unreachable {
        url: url.to_owned(),
        message,
    }
}

async fn error_from_response(response: reqwest::Response, url: &str) -> ClientError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let raw = match response.text().await {
        Ok(t) => t,
        Err(e) => return transport_error(url, &e),
    };
    let body = serde_json::from_str::<ErrorBody>(&raw).ok();
    let mut err = ClientError::from_response(status.as_u16(), body, &raw, retry_after);
    if let ClientError::InProgress { holder, .. } = &mut err {
        *holder = serde_json::from_str::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v.get("holder").and_then(|h| h.as_str()).map(str::to_owned));
    }
    if status == StatusCode::NOT_FOUND && matches!(err, ClientError::Server { .. }) {
        tracing::debug!(%url, "404 without a known code");
    }
    err
}

async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
    url: &str,
) -> Result<T, ClientError> {
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| transport_error(url, &e))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Server {
        status,
        code: None,
        message: format!("unreadable answer from {url}: {e}"),
    })
}

/// Object-safe JSON bodies, so `send` takes any request type without generics.
pub(crate) mod erased {
    /// A serializable request body.
    pub trait Body {
        /// Compact JSON.
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }

    impl<T: super::Serialize> Body for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_slashes_and_encode_reserved_characters() {
        assert_eq!(encode_key("vocab_import/RXNORM"), "vocab_import/RXNORM");
        assert_eq!(encode_key("clinic/patient 42"), "clinic/patient%2042");
        assert_eq!(encode_key("a?b#c%d/e&f=g"), "a%3Fb%23c%25d/e%26f%3Dg");
        assert_eq!(encode_key("ünï/cödé"), "%C3%BCn%C3%AF/c%C3%B6d%C3%A9");
        assert_eq!(encode_key("x-y_z.~"), "x-y_z.~");
    }

    #[test]
    fn keys_whose_segments_would_be_normalised_encode_every_slash() {
        assert_eq!(encode_key("a/../b"), "a%2F..%2Fb");
        assert_eq!(encode_key("a//b"), "a%2F%2Fb");
        assert_eq!(encode_key("/lead"), "%2Flead");
        assert_eq!(encode_key("trail/"), "trail%2F");
        assert_eq!(encode_key("./x"), ".%2Fx");
        assert_eq!(encode_key(".."), "%2E%2E");
        assert_eq!(encode_key("."), "%2E");
    }

    #[test]
    fn query_values_are_fully_encoded() {
        assert_eq!(encode_query("a/b c&d"), "a%2Fb%20c%26d");
    }

    #[test]
    fn builder_rejects_non_http_urls_and_trims_the_slash() {
        assert!(matches!(
            Client::new("127.0.0.1:7390"),
            Err(ClientError::Invalid { .. })
        ));
        let c = Client::new("http://127.0.0.1:7390/").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:7390");
        assert_eq!(c.url("/v1/locks"), "http://127.0.0.1:7390/v1/locks");
    }

    #[test]
    fn default_holder_is_user_at_host_colon_pid() {
        let h = default_holder();
        assert!(h.contains('@'), "{h}");
        assert!(h.ends_with(&format!(":{}", std::process::id())), "{h}");
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let c = Client::builder().token("s3cret").build().unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        // Port 9 (discard) on loopback is closed on test machines.
        let c = Client::builder()
            .base_url("http://127.0.0.1:9")
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let e = c.stats().await.unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    }
}
