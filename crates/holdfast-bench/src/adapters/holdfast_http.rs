//! holdfast spoken to over its HTTP/JSON API directly with reqwest and the wire types of
//! `holdfast-api`: `POST /v1/leases` with one exclusive lock (a waiting request long-polls in
//! the server's FIFO queue with `wait_ms`), `DELETE /v1/leases/{id}` to release.
//!
//! This is the fallback path used when no `holdfast-client` is wanted (`--holdfast-transport
//! http`); it sends exactly one request per acquire and per release, like the client does.

use std::time::Duration;

use anyhow::Context as _;
use holdfast_api::{CreateLeaseRequest, ErrorBody, ErrorCode, LeaseResponse, LockRequest};

use crate::adapter::{Durability, LOCK_TTL, LockConn, LockSystem};

/// Longest single wait the server accepts (`wait_ms` ≤ 60000); longer waits loop.
const WAIT_MS_MAX: u64 = 60_000;

/// A holdfast server reached over HTTP.
pub struct HoldfastHttpSystem {
    name: String,
    base_url: String,
    durability: Durability,
}

impl HoldfastHttpSystem {
    /// Reaches the server at `base_url` (`http://127.0.0.1:PORT`); `name` is the table label
    /// (`holdfast-sync`, ...), `durability` the mode it was started in.
    #[must_use]
    pub fn new(name: &str, base_url: &str, _wire: Option<&str>, durability: Durability) -> Self {
        Self {
            name: name.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            durability,
        }
    }
}

/// One reqwest client with at most one idle connection: one benchmark client, one connection.
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(WAIT_MS_MAX + 10_000))
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .context("build reqwest client")
}

impl LockSystem for HoldfastHttpSystem {
    type Conn = HoldfastHttpConn;

    fn name(&self) -> &str {
        &self.name
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    async fn connect(&self) -> anyhow::Result<HoldfastHttpConn> {
        let http = http_client()?;
        // Open the connection now so that connecting is not part of the first measured pair.
        http.get(format!("{}/healthz", self.base_url))
            .send()
            .await
            .context("connect to holdfast")?;
        Ok(HoldfastHttpConn {
            http,
            leases_url: format!("{}/v1/leases", self.base_url),
            holder: format!("bench-{:08x}", rand::random::<u32>()),
        })
    }
}

/// One holdfast client (its own HTTP connection).
pub struct HoldfastHttpConn {
    http: reqwest::Client,
    leases_url: String,
    holder: String,
}

impl LockConn for HoldfastHttpConn {
    type Token = String;

    async fn acquire(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<Option<String>> {
        let wait_ms = wait.map_or(0, |wait| {
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
        });
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let remaining_ms = u64::try_from(
                deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_millis(),
            )
            .unwrap_or(u64::MAX);
            let request = CreateLeaseRequest {
                holder: self.holder.clone(),
                ttl_ms: Some(u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX)),
                wait_ms: Some(remaining_ms.min(WAIT_MS_MAX)),
                reason: None,
                metadata: None,
                // Every grant is a new lease: a second acquire by the same holder must queue.
                reentrant: Some(false),
                locks: vec![LockRequest::exclusive(key)],
            };
            let response = self
                .http
                .post(&self.leases_url)
                .json(&request)
                .send()
                .await
                .context("POST /v1/leases")?;
            let status = response.status();
            if status.is_success() {
                let lease: LeaseResponse = response.json().await.context("lease body")?;
                return Ok(Some(lease.lease_id));
            }
            let body = response.text().await.unwrap_or_default();
            let error: Option<ErrorBody> = serde_json::from_str(&body).ok();
            match error.map(|error| error.error) {
                Some(ErrorCode::LockHeld) => return Ok(None),
                Some(ErrorCode::WaitTimeout) if remaining_ms <= WAIT_MS_MAX => return Ok(None),
                Some(ErrorCode::WaitTimeout) => {}
                _ => anyhow::bail!("POST /v1/leases for {key}: {status}: {body}"),
            }
        }
    }

    async fn release(&mut self, key: &str, token: String) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/{token}", self.leases_url))
            .send()
            .await
            .context("DELETE /v1/leases/{id}")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("release of {key}: DELETE /v1/leases/{{id}}: {status}: {body}");
        }
        Ok(())
    }
}
