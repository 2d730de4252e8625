//! 1,000 concurrent long-poll waiters on one key are served in FIFO order.

use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestServer;

const WAITERS: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_waiters_are_served_in_order() {
    let s = TestServer::memory().await;
    let key = "fifo/hot";
    let first = s.acquire("holder", &[key]).await;
    let order = Arc::new(Mutex::new(Vec::with_capacity(WAITERS)));
    let mut tasks = Vec::with_capacity(WAITERS);
    for i in 0..WAITERS {
        let c = s.handle();
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            let (st, lease) = c
                .post(
                    "/v1/leases",
                    json!({"holder": format!("w{i}"), "wait_ms": 60_000, "locks": [{"key": "fifo/hot"}]}),
                )
                .await;
            assert_eq!(st, StatusCode::OK, "waiter {i}: {lease}");
            order.lock().unwrap().push(i);
            // Hand the key on.
            let id = lease["lease_id"].as_str().unwrap();
            let (st, _) = c.delete(&format!("/v1/leases/{id}")).await;
            assert_eq!(st, StatusCode::OK);
        }));
        // Queue them one at a time so their arrival order is known.
        s.wait_for_waiters(key, i + 1).await;
    }
    let id = first["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        (0..WAITERS).collect::<Vec<_>>(),
        "grants out of FIFO order"
    );
    s.shutdown().await;
}
