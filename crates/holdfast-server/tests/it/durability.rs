//! Restart on the same data directory: acknowledged state is present, released state stays
//! released, fencing tokens keep increasing; a corrupt database stops startup.

use holdfast_server::{Durability, ServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestServer, assert_error};

async fn restart_keeps_state(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        durability,
        ..ServerConfig::ephemeral_sync(dir.path())
    };

    let s = TestServer::start(config.clone()).await;
    let kept = s.acquire("alice", &["dur/kept", "dur/also"]).await;
    let kept_id = kept["lease_id"].as_str().unwrap().to_owned();
    let released = s.acquire("bob", &["dur/released"]).await;
    let released_id = released["lease_id"].as_str().unwrap().to_owned();
    let (st, _) = s.delete(&format!("/v1/leases/{released_id}")).await;
    assert_eq!(st, StatusCode::OK);
    let (_, started) = s
        .post(
            "/v1/idempotency/dur/op",
            json!({"fingerprint": "f", "holder": "w"}),
        )
        .await;
    let lid = started["lease_id"].as_str().unwrap();
    let (st, _) = s
        .send(
            Method::PUT,
            "/v1/idempotency/dur/op",
            Some(json!({"lease_id": lid, "result": {"status": 201, "body": "done"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let max_token = [&kept, &released]
        .iter()
        .flat_map(|l| {
            l["locks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["fencing_token"].as_u64().unwrap())
        })
        .max()
        .unwrap();
    let (_, stats_before) = s.get("/v1/stats").await;
    s.shutdown().await;

    let s = TestServer::start(config.clone()).await;
    let (st, lease) = s.get(&format!("/v1/leases/{kept_id}")).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "acknowledged lease survives restart: {lease}"
    );
    assert_eq!(lease["locks"].as_array().unwrap().len(), 2);
    assert_eq!(lease["locks"], kept["locks"], "same tokens and counts");
    assert_error(
        &s.get(&format!("/v1/leases/{released_id}")).await,
        404,
        "lease_not_found",
    );
    assert_eq!(s.holders("dur/released").await, 0);
    assert_eq!(s.holders("dur/kept").await, 1);
    let (st, rec) = s.get("/v1/idempotency/dur/op").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["result"]["body"], "done");
    let (_, stats) = s.get("/v1/stats").await;
    assert_eq!(stats["leases"], stats_before["leases"]);
    assert_eq!(stats["active_locks"], stats_before["active_locks"]);
    // Tokens keep increasing.
    let fresh = s.acquire("carol", &["dur/released"]).await;
    assert!(fresh["locks"][0]["fencing_token"].as_u64().unwrap() > max_token);
    // Renew still works on the recovered lease.
    let (st, _) = s
        .post(&format!("/v1/leases/{kept_id}/renew"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_restart_keeps_acknowledged_state() {
    restart_keeps_state(Durability::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_graceful_restart_keeps_state() {
    restart_keeps_state(Durability::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::ephemeral_sync(dir.path());
    let mut last = 0;
    for round in 0..3 {
        let s = TestServer::start(config.clone()).await;
        for _ in 0..3 {
            let l = s.acquire("h", &["tok/k"]).await;
            let t = l["locks"][0]["fencing_token"].as_u64().unwrap();
            assert!(t > last, "round {round}: token {t} after {last}");
            last = t;
            let id = l["lease_id"].as_str().unwrap();
            s.delete(&format!("/v1/leases/{id}")).await;
        }
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_database_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("holdfast.redb"), vec![0x42u8; 128 * 1024]).unwrap();
    let err = holdfast_server::start(ServerConfig::ephemeral_sync(dir.path()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("holdfast.redb") || msg.contains(&dir.path().display().to_string()),
        "{msg}"
    );
    // The file is untouched (never reset).
    assert_eq!(
        std::fs::read(dir.path().join("holdfast.redb")).unwrap(),
        vec![0x42u8; 128 * 1024]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_data_dir_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = holdfast_server::start(ServerConfig::ephemeral_sync(&file))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(ServerConfig::ephemeral_sync(dir.path())).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let c = s.handle();
        tasks.push(tokio::spawn(async move {
            for j in 0..10 {
                let l = c.acquire("g", &[&format!("gc/{i}/{j}")]).await;
                let id = l["lease_id"].as_str().unwrap().to_owned();
                let (st, _) = c.delete(&format!("/v1/leases/{id}")).await;
                assert_eq!(st, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counters = s.server.as_ref().unwrap().counters();
    let fsyncs = counters.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
    // Behaviour, not timing: every change was committed durably (at most one fsync per
    // request, plus the startup commit).
    assert!((1..=640 + 1).contains(&fsyncs), "fsyncs {fsyncs}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_extends_leases_by_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        restart_grace_ms: 600_000,
        ..ServerConfig::ephemeral_sync(dir.path())
    };
    let s = TestServer::start(config.clone()).await;
    let (st, lease) = s
        .post(
            "/v1/leases",
            json!({"holder": "h", "ttl_ms": 5_000, "locks": [{"key": "grace/k"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let id = lease["lease_id"].as_str().unwrap().to_owned();
    s.shutdown().await;
    let s = TestServer::start(config).await;
    let (st, after) = s.get(&format!("/v1/leases/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        after["remaining_ms"].as_u64().unwrap() > 5_000,
        "expiry extended to at least restart + grace: {after}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::ephemeral_sync(dir.path());
    let first = TestServer::start(config.clone()).await;
    let err = holdfast_server::start(config).await.unwrap_err();
    assert!(err.to_string().contains("holdfast.redb"), "{err}");
    eprintln!("second server on the same directory: {err}");
    first.shutdown().await;
}
