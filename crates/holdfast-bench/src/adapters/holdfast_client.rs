//! holdfast through its Rust client, `holdfast-client`, as an application uses it:
//! `client.lock(key).holder(..).ttl(..).wait(..).acquire()` returns a guard (which renews the
//! lease in the background), `guard.release()` releases. A waiting acquire long-polls in the
//! server's FIFO queue (`wait_ms`), so a waiter is woken by the server, not by polling.

use std::time::Duration;

use anyhow::Context as _;
use holdfast_client::{Client, ClientError, LockGuard};

use crate::adapter::{Durability, LOCK_TTL, LockConn, LockSystem};

/// A holdfast server reached through `holdfast-client`.
pub struct HoldfastClientSystem {
    name: String,
    base_url: String,
    /// `Some` = speak the wire protocol for leases; `Some(None)` = asked for but unknown.
    wire: Option<Option<String>>,
    durability: Durability,
}

impl HoldfastClientSystem {
    /// Reaches the server at `base_url` (`http://127.0.0.1:PORT`); `name` is the table label
    /// (`holdfast-sync`, ...), `durability` the mode it was started in.
    #[must_use]
    pub fn new(name: &str, base_url: &str, _wire: Option<&str>, durability: Durability) -> Self {
        Self {
            name: name.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            wire: None,
            durability,
        }
    }

    /// Like [`HoldfastClientSystem::new`], but leases go over the wire protocol at `wire`.
    #[must_use]
    pub fn with_wire(
        name: &str,
        base_url: &str,
        wire: Option<&str>,
        durability: Durability,
    ) -> Self {
        Self {
            wire: Some(wire.map(str::to_owned)),
            ..Self::new(name, base_url, None, durability)
        }
    }
}

impl LockSystem for HoldfastClientSystem {
    type Conn = HoldfastClientConn;

    fn name(&self) -> &str {
        &self.name
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    async fn connect(&self) -> anyhow::Result<HoldfastClientConn> {
        // One `Client` per benchmark client: its own connection pool, used by one request at
        // a time, so one connection.
        let holder = format!("bench-{:08x}", rand::random::<u32>());
        let wire = match &self.wire {
            None => None,
            Some(Some(addr)) => Some(addr.clone()),
            Some(None) => anyhow::bail!(
                "{}: the wire transport was asked for but the server announced no wire address",
                self.name
            ),
        };
        let client = Client::builder()
            .base_url(&self.base_url)
            .wire_opt(wire)
            .holder(&holder)
            .connect_timeout(Duration::from_secs(5))
            .request_timeout(Duration::from_secs(10))
            .build()
            .context("build holdfast client")?;
        // Open the connection now so that connecting is not part of the first measured pair.
        client.connect().await.context("connect to holdfast")?;
        Ok(HoldfastClientConn { client })
    }
}

/// One holdfast client.
pub struct HoldfastClientConn {
    client: Client,
}

impl LockConn for HoldfastClientConn {
    type Token = LockGuard;

    async fn acquire(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<Option<LockGuard>> {
        let outcome = self
            .client
            .lock(key)
            .ttl(LOCK_TTL)
            .wait(wait.unwrap_or(Duration::ZERO))
            .acquire()
            .await;
        match outcome {
            Ok(guard) => Ok(Some(guard)),
            Err(ClientError::Held { .. } | ClientError::Timeout { .. }) => Ok(None),
            Err(err) => Err(err).with_context(|| format!("holdfast acquire of {key}")),
        }
    }

    async fn release(&mut self, key: &str, guard: LockGuard) -> anyhow::Result<()> {
        guard
            .release()
            .await
            .with_context(|| format!("holdfast release of {key}"))
    }

    /// Stops the guard's renewal and forgets it: dropping it would release it in the
    /// background (W4 kills the server under a million guards; that would be a million doomed
    /// requests during the restart being measured).
    fn abandon(guard: LockGuard) {
        let _lease = guard.detach();
    }
}
