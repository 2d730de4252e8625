//! Randomized concurrent histories against a real server, checked as they happen.
//!
//! Many HTTP clients contend for a few keys with random wait bounds (some so short that the
//! waiter times out, which exercises the host's timers), while an observer lists the locks and
//! reads stats (commands the host thread serves, interleaved with the lease commands that memory
//! mode applies on the connection threads). The checker asserts mutual exclusion (at most one
//! holder per key at a time, as the clients observe it) and that fencing tokens of one key
//! strictly increase in grant order. Every client's release is answered 200, and the server ends
//! with no locks and no waiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

const KEYS: [&str; 3] = ["hist/a", "hist/b", "hist/c"];
const CLIENTS: usize = 12;
const ROUNDS: usize = 60;

#[derive(Default)]
struct Checker {
    /// Key → the client holding it, as observed.
    holder: HashMap<&'static str, usize>,
    /// Key → the last fencing token granted.
    last_token: HashMap<&'static str, u64>,
    grants: usize,
    timeouts: usize,
}

impl Checker {
    fn granted(&mut self, key: &'static str, client: usize, token: u64) {
        if let Some(other) = self.holder.insert(key, client) {
            panic!("{key}: client {client} granted while client {other} holds it");
        }
        let last = self.last_token.insert(key, token).unwrap_or(0);
        assert!(
            token > last,
            "{key}: fencing token {token} granted after {last}"
        );
        self.grants += 1;
    }

    fn releasing(&mut self, key: &'static str, client: usize) {
        assert_eq!(
            self.holder.remove(key),
            Some(client),
            "{key}: not the holder"
        );
    }
}

async fn run_history(s: &TestServer, seed: u64) {
    let checker = Arc::new(Mutex::new(Checker::default()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let s = s.handle();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut reads = 0_u32;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let (st, _) = s.get("/v1/locks?prefix=hist/").await;
                assert_eq!(st, StatusCode::OK);
                let (st, _) = s.get("/v1/stats").await;
                assert_eq!(st, StatusCode::OK);
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    };
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let s = s.handle();
        let checker = Arc::clone(&checker);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + client as u64);
            for _ in 0..ROUNDS {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                // Mostly patient waiters; one in five gives up after 0–3 ms.
                let wait_ms: u64 = if rng.random_range(0..5) == 0 {
                    rng.random_range(0..4)
                } else {
                    30_000
                };
                let (st, body) = s
                    .post(
                        "/v1/leases",
                        json!({"holder": format!("c{client}"), "ttl_ms": 60_000,
                               "wait_ms": wait_ms, "locks": [{"key": key}]}),
                    )
                    .await;
                if st == StatusCode::CONFLICT {
                    let expected = if wait_ms == 0 {
                        "lock_held"
                    } else {
                        "wait_timeout"
                    };
                    assert_eq!(body["error"], expected, "{body}");
                    checker.lock().unwrap().timeouts += 1;
                    continue;
                }
                assert_eq!(st, StatusCode::OK, "{body}");
                let token = body["locks"][0]["fencing_token"].as_u64().expect("token");
                checker.lock().unwrap().granted(key, client, token);
                if rng.random_bool(0.5) {
                    tokio::task::yield_now().await;
                }
                checker.lock().unwrap().releasing(key, client);
                let id = body["lease_id"].as_str().expect("lease id");
                let (st, body) = s.delete(&format!("/v1/leases/{id}")).await;
                assert_eq!(st, StatusCode::OK, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = observer.await.expect("observer");
    {
        let c = checker.lock().unwrap();
        assert_eq!(c.grants + c.timeouts, CLIENTS * ROUNDS);
        assert!(c.grants > 0 && reads > 0);
    }
    for key in KEYS {
        assert_eq!(s.holders(key).await, 0, "{key} still held");
        assert_eq!(s.waiters(key).await, 0, "{key} still has waiters");
    }
    let (st, stats) = s.get("/v1/stats").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(stats["active_locks"], 0, "{stats}");
    assert_eq!(stats["leases"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_mode_history_is_mutually_exclusive_with_increasing_tokens() {
    let s = TestServer::memory().await;
    run_history(&s, 1).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_mode_history_is_mutually_exclusive_with_increasing_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start(holdfast_server::ServerConfig::ephemeral_sync(dir.path())).await;
    run_history(&s, 100).await;
    s.shutdown().await;
}
