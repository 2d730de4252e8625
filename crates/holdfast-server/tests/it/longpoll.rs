//! Long-poll waits: granted on release, timeouts, and disconnects that leave no ghost waiter
//! and no leaked grant.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_is_granted_when_holder_releases() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["lp/k"]).await;
    let c = s.handle();
    let waiter = tokio::spawn(async move {
        c.post(
            "/v1/leases",
            json!({"holder": "bob", "wait_ms": 30_000, "locks": [{"key": "lp/k"}]}),
        )
        .await
    });
    s.wait_for_waiters("lp/k", 1).await;
    let (_, info) = s.get("/v1/locks/lp/k").await;
    assert_eq!(info["waiters"][0]["holder"], "bob");
    let id = a["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;
    let (st, granted) = waiter.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{granted}");
    assert_eq!(granted["holder"], "bob");
    assert!(
        granted["locks"][0]["fencing_token"].as_u64() > a["locks"][0]["fencing_token"].as_u64()
    );
    s.shutdown().await;
}

async fn wait_until_free(s: &TestServer, key: &str) {
    for _ in 0..2_000 {
        if s.waiters(key).await == 0 && s.holders(key).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, info) = s.get(&format!("/v1/locks/{key}")).await;
    panic!("key {key} not free: {info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_waiter_leaves_the_queue() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["lp/ghost"]).await;
    let c = s.handle();
    let waiter = tokio::spawn(async move {
        c.post(
            "/v1/leases",
            json!({"holder": "ghost", "wait_ms": 60_000, "locks": [{"key": "lp/ghost"}]}),
        )
        .await
    });
    s.wait_for_waiters("lp/ghost", 1).await;
    waiter.abort();
    let _ = waiter.await;
    s.wait_for_waiters("lp/ghost", 0).await;
    let id = a["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;
    // No grant was leaked to the ghost.
    wait_until_free(&s, "lp/ghost").await;
    let (_, list) = s.get("/v1/locks").await;
    assert!(list["locks"].as_array().unwrap().is_empty(), "{list}");
    s.shutdown().await;
}

/// Sends a waiting `POST /v1/leases` on a raw connection, so the test decides exactly when the
/// client's side closes (reqwest closes a dropped request's connection later, on its own task).
async fn raw_waiting_request(s: &TestServer, holder: &str, key: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let body = json!({"holder": holder, "wait_ms": 60_000, "locks": [{"key": key}]}).to_string();
    let addr = s.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /v1/leases HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_racing_a_disconnect_is_never_leaked() {
    grant_racing_a_disconnect(TestServer::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_racing_a_disconnect_is_never_leaked_in_sync_mode() {
    let dir = tempfile::tempdir().unwrap();
    let config = holdfast_server::ServerConfig::ephemeral_sync(dir.path());
    grant_racing_a_disconnect(TestServer::start(config).await).await;
}

async fn grant_racing_a_disconnect(s: TestServer) {
    for round in 0..40 {
        let key = format!("lp/race/{round}");
        let a = s.acquire("alice", &[&key]).await;
        let waiter = raw_waiting_request(&s, "racer", &key).await;
        s.wait_for_waiters(&key, 1).await;
        // The client is gone (its FIN is in the server's socket) before the release is even
        // sent; the server may still see the release first. Either the cancel wins (no grant)
        // or the grant lands in a reply channel whose handler is then dropped, and is undone.
        // Nothing may stay held: the racer's lease would otherwise live for 30 s.
        drop(waiter);
        let id = a["lease_id"].as_str().unwrap();
        let (st, _) = s.delete(&format!("/v1/leases/{id}")).await;
        assert_eq!(st, StatusCode::OK);
        wait_until_free(&s, &key).await;
    }
    let (_, stats) = s.get("/v1/stats").await;
    assert_eq!(stats["expirations_total"], 0, "{stats}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_queued_waiters() {
    let s = TestServer::memory().await;
    s.acquire("alice", &["lp/sd"]).await;
    let c = s.handle();
    let waiter = tokio::spawn(async move {
        let resp = c
            .client
            .post(c.url("/v1/leases"))
            .json(&json!({"holder": "bob", "wait_ms": 60_000, "locks": [{"key": "lp/sd"}]}))
            .send()
            .await;
        resp.map(|r| r.status())
    });
    s.wait_for_waiters("lp/sd", 1).await;
    s.shutdown().await;
    // The waiter got an answer (503 overloaded) or its connection closed; it did not hang.
    match waiter.await.unwrap() {
        Ok(status) => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_waiters_are_bounded() {
    let mut config = holdfast_server::ServerConfig::ephemeral_memory();
    config.limits.waiters_total_max = 1;
    let s = TestServer::start(config).await;
    s.acquire("alice", &["tw/a", "tw/b"]).await;
    let c = s.handle();
    let waiter = tokio::spawn(async move {
        c.post(
            "/v1/leases",
            json!({"holder": "bob", "wait_ms": 1_000, "locks": [{"key": "tw/a"}]}),
        )
        .await
    });
    s.wait_for_waiters("tw/a", 1).await;
    let answer = s
        .post(
            "/v1/leases",
            json!({"holder": "carol", "wait_ms": 1_000, "locks": [{"key": "tw/b"}]}),
        )
        .await;
    crate::common::assert_error(&answer, 503, "overloaded");
    // No-wait requests are not affected.
    crate::common::assert_error(
        &s.post(
            "/v1/leases",
            json!({"holder": "dave", "locks": [{"key": "tw/b"}]}),
        )
        .await,
        409,
        "lock_held",
    );
    crate::common::assert_error(&waiter.await.unwrap(), 409, "wait_timeout");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_wakes_the_next_waiter() {
    let s = TestServer::memory().await;
    let (st, short) = s
        .post(
            "/v1/leases",
            json!({"holder": "short", "ttl_ms": 1_000, "locks": [{"key": "lp/exp"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // The waiter is served when the holder's lease expires (nobody releases it).
    let (st, granted) = s
        .post(
            "/v1/leases",
            json!({"holder": "next", "wait_ms": 30_000, "locks": [{"key": "lp/exp"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{granted}");
    assert_eq!(granted["holder"], "next");
    let id = short["lease_id"].as_str().unwrap();
    crate::common::assert_error(
        &s.post(&format!("/v1/leases/{id}/renew"), json!({})).await,
        404,
        "lease_not_found",
    );
    let (_, stats) = s.get("/v1/stats").await;
    assert!(stats["expirations_total"].as_u64().unwrap() >= 1, "{stats}");
    s.shutdown().await;
}
