//! The client over the wire protocol (`ClientBuilder::wire`) against an in-process server:
//! the same behaviour as over HTTP, many tasks multiplexed on one connection, abandoned
//! acquisitions that leave no waiter and hold no lock, and reconnection after the server
//! restarts. Nothing asserts on elapsed time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use holdfast_client::{Client, ClientError, LostReason};
use holdfast_server::{RunningServer, ServerConfig};

async fn start(config: ServerConfig) -> (RunningServer, Client) {
    let server = holdfast_server::start(config).await.expect("server starts");
    let client = wire_client(&server);
    (server, client)
}

fn wire_client(server: &RunningServer) -> Client {
    Client::builder()
        .base_url(server.base_url())
        .wire(server.wire_addr.expect("wire enabled").to_string())
        .request_timeout(Duration::from_secs(10))
        .holder("wire-default")
        .build()
        .expect("client")
}

async fn waiters(client: &Client, key: &str) -> usize {
    client.lock_state(key).await.expect("state").waiters.len()
}

async fn holders(client: &Client, key: &str) -> Vec<String> {
    client
        .lock_state(key)
        .await
        .expect("state")
        .holders
        .into_iter()
        .map(|h| h.holder)
        .collect()
}

/// Poll `check` every 20 ms, at most `tries` times.
async fn eventually<F, Fut>(tries: u32, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..tries {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_work_over_the_wire_like_over_http() {
    let (_server, client) = start(ServerConfig::ephemeral_memory()).await;
    assert!(client.wire_addr().is_some());
    let g1 = client
        .lock("w/a")
        .holder("importer@host-1")
        .acquire()
        .await
        .unwrap();
    assert_eq!(holders(&client, "w/a").await, vec!["importer@host-1"]);
    let err = client
        .lock("w/a")
        .holder("importer@host-2")
        .acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Held { .. }), "{err:?}");
    assert!(
        err.to_string().contains("held by importer@host-1 since"),
        "{err}"
    );
    let t1 = g1.fencing_token();
    let lease = client.get_lease(g1.lease_id()).await.unwrap();
    assert_eq!(lease.holder, "importer@host-1");
    let renewed = client
        .renew(g1.lease_id(), Some(Duration::from_secs(90)))
        .await
        .unwrap();
    assert_eq!(renewed.ttl_ms, 90_000);
    g1.release().await.unwrap();
    assert!(holders(&client, "w/a").await.is_empty());
    let g2 = client.lock("w/a").holder("two").acquire().await.unwrap();
    assert!(g2.fencing_token() > t1);
    // Errors map to the same typed variants.
    assert!(matches!(
        client.release("00000000000000000000000000000001").await,
        Err(ClientError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        client.release("nonsense").await,
        Err(ClientError::Invalid { .. })
    ));
    g2.release().await.unwrap();
    // A guard's release does not read the answer's body, only its status: a lease that is
    // gone still shows as lost.
    let g3 = client.lock("w/b").acquire().await.unwrap();
    client
        .force_release_lease(g3.lease_id(), "maintenance")
        .await
        .unwrap();
    assert!(matches!(
        g3.release().await,
        Err(ClientError::Lost(LostReason::NotFound))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_renews_over_the_wire_and_waits_are_granted_in_order() {
    let (_server, client) = start(ServerConfig::ephemeral_memory()).await;
    let g = client
        .lock("w/renew")
        .holder("first")
        .ttl(Duration::from_millis(1_500))
        .acquire()
        .await
        .unwrap();
    let lease = g.lease_id().to_owned();
    let before = client.get_lease(&lease).await.unwrap().expires_at_ms;
    assert!(
        eventually(500, || {
            let client = client.clone();
            let lease = lease.clone();
            async move { client.get_lease(&lease).await.unwrap().expires_at_ms > before }
        })
        .await,
        "the guard renewed its lease"
    );
    let c2 = client.clone();
    let second = tokio::spawn(async move {
        c2.lock("w/renew")
            .holder("second")
            .wait(Duration::from_secs(30))
            .acquire()
            .await
    });
    assert!(eventually(500, || async { waiters(&client, "w/renew").await == 1 }).await);
    g.release().await.unwrap();
    let g2 = second.await.unwrap().expect("granted on release");
    assert_eq!(holders(&client, "w/renew").await, vec!["second"]);
    g2.release().await.unwrap();
}

/// Many tasks on one multiplexed connection (and a few on their own) contend for a handful
/// of keys; each holder checks that nobody else is inside and that fencing tokens only grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_connection_without_overlap() {
    many_tasks_without_overlap(ServerConfig::ephemeral_memory()).await;
}

/// The same in `sync` mode, where no request is answered on the connection task's first poll
/// (each waits for its commit) and the answers come back from the syncer thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_connection_without_overlap_in_sync_mode() {
    let dir = tempfile::tempdir().unwrap();
    many_tasks_without_overlap(ServerConfig::ephemeral_sync(dir.path())).await;
}

async fn many_tasks_without_overlap(config: ServerConfig) {
    let (server, shared) = start(config).await;
    let keys = ["w/k0", "w/k1", "w/k2"];
    let inside: Arc<Vec<AtomicBool>> =
        Arc::new(keys.iter().map(|_| AtomicBool::new(false)).collect());
    let last_token: Arc<Vec<AtomicU64>> =
        Arc::new(keys.iter().map(|_| AtomicU64::new(0)).collect());
    let grants = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let client = if t % 6 == 0 {
            wire_client(&server)
        } else {
            shared.clone()
        };
        let inside = Arc::clone(&inside);
        let last_token = Arc::clone(&last_token);
        let grants = Arc::clone(&grants);
        tasks.push(tokio::spawn(async move {
            for round in 0..15u64 {
                let k = ((t + round) % 3) as usize;
                let g = client
                    .lock(keys[k])
                    .holder(format!("task-{t}"))
                    .wait(Duration::from_secs(30))
                    .acquire()
                    .await
                    .expect("granted within the wait");
                assert!(
                    !inside[k].swap(true, Ordering::SeqCst),
                    "two holders of {} at once",
                    keys[k]
                );
                let token = g.fencing_token();
                let prev = last_token[k].swap(token, Ordering::SeqCst);
                assert!(token > prev, "token {token} after {prev} on {}", keys[k]);
                tokio::task::yield_now().await;
                inside[k].store(false, Ordering::SeqCst);
                g.release().await.expect("release");
                grants.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task ok");
    }
    assert_eq!(grants.load(Ordering::SeqCst), 24 * 15);
    for key in keys {
        assert!(holders(&shared, key).await.is_empty());
        assert_eq!(waiters(&shared, key).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_wait_leaves_no_waiter_and_holds_nothing() {
    let (_server, client) = start(ServerConfig::ephemeral_memory()).await;
    let g = client
        .lock("w/drop")
        .holder("owner")
        .acquire()
        .await
        .unwrap();

    // A wait abandoned by its caller (timeout around the future) is cancelled.
    let c2 = client.clone();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        c2.lock("w/drop")
            .holder("impatient")
            .wait(Duration::from_secs(30))
            .acquire(),
    )
    .await;
    assert!(abandoned.is_err(), "still waiting when abandoned");
    assert!(
        eventually(500, || async { waiters(&client, "w/drop").await == 0 }).await,
        "the cancelled request left the queue"
    );
    g.release().await.unwrap();
    assert!(holders(&client, "w/drop").await.is_empty());

    // Abandon many waits at random moments while the lock changes hands: whatever was granted
    // to an abandoned request is given back by the client, so the key ends free.
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_millis(1 + (i * 7) % 23),
                c.lock("w/churn")
                    .holder(format!("h{i}"))
                    .wait(Duration::from_secs(30))
                    .acquire(),
            )
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        eventually(1_000, || async {
            holders(&client, "w/churn").await.is_empty() && waiters(&client, "w/churn").await == 0
        })
        .await,
        "abandoned acquisitions hold nothing: holders {:?}",
        holders(&client, "w/churn").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(ServerConfig::ephemeral_sync(dir.path())).await;
    let (http, wire) = (server.addr, server.wire_addr.unwrap());
    let client = Client::builder()
        .base_url(format!("http://{http}"))
        .wire(wire.to_string())
        .holder("survivor")
        .build()
        .unwrap();
    let g = client.lock("w/restart").acquire().await.unwrap();
    let lease = g.lease_id().to_owned();
    std::mem::forget(g);
    server.shutdown().await;

    // Down: the call fails as unreachable, not with a hang or a panic.
    assert!(matches!(
        client.get_lease(&lease).await,
        Err(ClientError::Unreachable { .. })
    ));

    let mut config = ServerConfig::ephemeral_sync(dir.path());
    config.listen = http.to_string();
    config.wire_listen = Some(wire.to_string());
    let server = holdfast_server::start(config)
        .await
        .expect("restart on the same ports");
    // The next call opens a new connection; the lease survived the restart.
    let got = client.get_lease(&lease).await.expect("reconnected");
    assert_eq!(got.holder, "survivor");
    let released = client.release(&lease).await.unwrap();
    assert_eq!(released.lease_id, lease);
    assert!(holders(&client, "w/restart").await.is_empty());
    server.shutdown().await;
}
