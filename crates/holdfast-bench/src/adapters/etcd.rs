//! etcd v3 locks the way `etcdctl lock` takes them: grant a lease, `Lock` the name with that
//! lease (the server queues the request behind earlier keys of the same name, by revision),
//! then `Unlock` and revoke the lease. Each step is a Raft proposal.
//!
//! etcd has no try-lock; no-wait is a `Lock` call abandoned after [`ETCD_NO_WAIT`], and any
//! abandoned (or timed-out) wait revokes its lease so its queued key disappears.

use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, ConnectOptions, LockOptions};

use crate::adapter::{Durability, LOCK_TTL, LockConn, LockSystem};

/// How long a "no-wait" acquire waits, etcd offering no try-lock.
pub const ETCD_NO_WAIT: Duration = Duration::from_millis(100);

/// An etcd server (one member).
pub struct EtcdSystem {
    endpoint: String,
}

impl EtcdSystem {
    /// Reaches etcd at `endpoint` (`http://127.0.0.1:2389`).
    #[must_use]
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
        }
    }
}

impl LockSystem for EtcdSystem {
    type Conn = EtcdConn;

    fn name(&self) -> &str {
        "etcd"
    }

    /// Raft log fsynced before a proposal is applied; proposals arriving together share one
    /// WAL fsync.
    fn durability(&self) -> Durability {
        Durability::GroupCommit
    }

    async fn connect(&self) -> anyhow::Result<EtcdConn> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(70));
        let client = Client::connect([self.endpoint.as_str()], Some(options))
            .await
            .context("connect to etcd")?;
        Ok(EtcdConn { client })
    }
}

/// One etcd client (its own gRPC channel).
pub struct EtcdConn {
    client: Client,
}

/// The lock's own key (name/lease-id) and the lease that owns it.
pub struct EtcdToken {
    lock_key: Vec<u8>,
    lease_id: i64,
}

impl LockConn for EtcdConn {
    type Token = EtcdToken;

    async fn acquire(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> anyhow::Result<Option<EtcdToken>> {
        let ttl_s = i64::try_from(LOCK_TTL.as_secs()).unwrap_or(i64::MAX);
        let lease_id = self
            .client
            .lease_grant(ttl_s, None)
            .await
            .context("etcd lease grant")?
            .id();
        let options = LockOptions::new().with_lease(lease_id);
        let wait = wait.unwrap_or(ETCD_NO_WAIT);
        match tokio::time::timeout(wait, self.client.lock(key, Some(options))).await {
            Ok(Ok(reply)) => Ok(Some(EtcdToken {
                lock_key: reply.key().to_vec(),
                lease_id,
            })),
            Ok(Err(err)) => {
                let _ = self.client.lease_revoke(lease_id).await;
                Err(err).context("etcd lock")
            }
            Err(_elapsed) => {
                // Revoking the lease deletes the queued key, so no stale waiter stays behind.
                self.client
                    .lease_revoke(lease_id)
                    .await
                    .context("etcd lease revoke after a timed-out wait")?;
                Ok(None)
            }
        }
    }

    async fn release(&mut self, _key: &str, token: EtcdToken) -> anyhow::Result<()> {
        self.client
            .unlock(token.lock_key)
            .await
            .context("etcd unlock")?;
        self.client
            .lease_revoke(token.lease_id)
            .await
            .context("etcd lease revoke")?;
        Ok(())
    }
}
