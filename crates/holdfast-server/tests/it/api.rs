//! Every endpoint and every error code.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lifecycle_with_slashes_and_percent_encoding() {
    let s = TestServer::memory().await;
    let key = "clinic/patient 42/ü%/x";
    let (st, lease) = s
        .post(
            "/v1/leases",
            json!({"holder": "alice", "ttl_ms": 20_000, "reason": "editing", "metadata": {"ticket": 7},
                   "locks": [{"key": key}, {"key": "clinic/shared", "mode": "shared"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{lease}");
    let id = lease["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(lease["holder"], "alice");
    assert_eq!(lease["metadata"]["ticket"], 7);
    assert_eq!(lease["locks"].as_array().unwrap().len(), 2);
    let token = lease["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == key)
        .unwrap()["fencing_token"]
        .as_u64()
        .unwrap();

    // Inspect the key through its percent-encoded path.
    let (st, info) = s.get(&format!("/v1/locks/{}", enc(key))).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(info["key"], key);
    assert_eq!(info["holders"][0]["holder"], "alice");
    assert_eq!(info["holders"][0]["reason"], "editing");
    assert_eq!(info["holders"][0]["fencing_token"], token);

    // Read, renew (empty body and explicit TTL).
    let (st, got) = s.get(&format!("/v1/leases/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["lease_id"], id.as_str());
    let (st, renewed) = s
        .send(Method::POST, &format!("/v1/leases/{id}/renew"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{renewed}");
    let (st, renewed) = s
        .post(&format!("/v1/leases/{id}/renew"), json!({"ttl_ms": 60_000}))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(renewed["ttl_ms"], 60_000);

    // Add a lock, release one lock by its key with a slash.
    let (st, more) = s
        .post(
            &format!("/v1/leases/{id}/locks"),
            json!({"locks": [{"key": "clinic/more"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{more}");
    assert_eq!(more["locks"].as_array().unwrap().len(), 3);
    let (st, after) = s
        .delete(&format!("/v1/leases/{id}/locks/{}", enc(key)))
        .await;
    assert_eq!(st, StatusCode::OK, "{after}");
    assert_eq!(after["locks"].as_array().unwrap().len(), 2);
    assert_eq!(s.holders(key).await, 0);

    // Listing with filters.
    let (st, list) = s.get("/v1/locks?prefix=clinic/&holder=alice").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["locks"].as_array().unwrap().len(), 2);
    let (_, list) = s.get("/v1/locks?prefix=other/").await;
    assert!(list["locks"].as_array().unwrap().is_empty());

    // Release the lease; it is gone.
    let (st, gone) = s.delete(&format!("/v1/leases/{id}")).await;
    assert_eq!(st, StatusCode::OK, "{gone}");
    assert_error(
        &s.get(&format!("/v1/leases/{id}")).await,
        404,
        "lease_not_found",
    );
    let (_, list) = s.get("/v1/locks").await;
    assert!(list["locks"].as_array().unwrap().is_empty(), "{list}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_held_names_holders() {
    let s = TestServer::memory().await;
    s.acquire("alice", &["k/1"]).await;
    let answer = s
        .post(
            "/v1/leases",
            json!({"holder": "bob", "locks": [{"key": "k/1"}]}),
        )
        .await;
    assert_error(&answer, 409, "lock_held");
    assert_eq!(answer.1["key"], "k/1");
    assert_eq!(answer.1["holders"][0]["holder"], "alice");
    assert!(
        answer.1["holders"][0].get("lease_id").is_none(),
        "no lease id in refusals"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout() {
    let s = TestServer::memory().await;
    s.acquire("alice", &["k"]).await;
    let answer = s
        .post(
            "/v1/leases",
            json!({"holder": "bob", "wait_ms": 1_000, "locks": [{"key": "k"}]}),
        )
        .await;
    assert_error(&answer, 409, "wait_timeout");
    assert_eq!(s.waiters("k").await, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlock_victim_is_refused() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["x"]).await;
    let b = s.acquire("bob", &["y"]).await;
    let a_id = a["lease_id"].as_str().unwrap().to_owned();
    let b_id = b["lease_id"].as_str().unwrap().to_owned();
    let s2 = s.handle();
    let waiting = tokio::spawn(async move {
        s2.post(
            &format!("/v1/leases/{b_id}/locks"),
            json!({"wait_ms": 30_000, "locks": [{"key": "x"}]}),
        )
        .await
    });
    s.wait_for_waiters("x", 1).await;
    let answer = s
        .post(
            &format!("/v1/leases/{a_id}/locks"),
            json!({"wait_ms": 30_000, "locks": [{"key": "y"}]}),
        )
        .await;
    assert_error(&answer, 409, "deadlock");
    assert!(!answer.1["cycle"].as_array().unwrap().is_empty());
    // Alice releases: bob's queued request is granted.
    let (st, _) = s.delete(&format!("/v1/leases/{a_id}")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, granted) = waiting.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{granted}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_and_limit_mismatch() {
    let s = TestServer::memory().await;
    for h in ["a", "b"] {
        let (st, body) = s
            .post(
                "/v1/leases",
                json!({"holder": h, "locks": [{"key": "pool", "limit": 2}]}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(body["locks"][0]["mode"], "semaphore");
    }
    assert_error(
        &s.post(
            "/v1/leases",
            json!({"holder": "c", "locks": [{"key": "pool", "limit": 2}]}),
        )
        .await,
        409,
        "lock_held",
    );
    assert_error(
        &s.post(
            "/v1/leases",
            json!({"holder": "c", "locks": [{"key": "pool", "limit": 3}]}),
        )
        .await,
        409,
        "limit_mismatch",
    );
    let (_, info) = s.get("/v1/locks/pool").await;
    assert_eq!(info["limit"], 2);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_and_lock_not_found() {
    let s = TestServer::memory().await;
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_error(
        &s.post(&format!("/v1/leases/{unknown}/renew"), json!({}))
            .await,
        404,
        "lease_not_found",
    );
    assert_error(
        &s.delete(&format!("/v1/leases/{unknown}")).await,
        404,
        "lease_not_found",
    );
    let lease = s.acquire("alice", &["a"]).await;
    let id = lease["lease_id"].as_str().unwrap();
    assert_error(
        &s.delete(&format!("/v1/leases/{id}/locks/not/held")).await,
        404,
        "lock_not_found",
    );
    assert_error(
        &s.post(
            "/v1/admin/locks/free/key/release",
            json!({"reason": "cleanup"}),
        )
        .await,
        404,
        "lock_not_found",
    );
    // A malformed lease id names the field.
    let answer = s.get("/v1/leases/not-hex").await;
    assert_error(&answer, 400, "invalid_request");
    assert_eq!(answer.1["field"], "lease_id");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_states() {
    let s = TestServer::memory().await;
    let path = "/v1/idempotency/booking/42";
    let (st, started) = s
        .post(path, json!({"fingerprint": "f1", "holder": "w1"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{started}");
    assert_eq!(started["state"], "started");
    let lease_id = started["lease_id"].as_str().unwrap().to_owned();

    // A twin sees in_progress with Retry-After; the body is an error body with the state.
    let resp = s
        .client
        .post(s.url(path))
        .json(&json!({"fingerprint": "f1", "holder": "w2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "in_progress");
    assert_eq!(body["state"], "in_progress");
    assert_eq!(body["holder"], "w1");

    assert_error(
        &s.post(path, json!({"fingerprint": "other", "holder": "w3"}))
            .await,
        422,
        "fingerprint_mismatch",
    );

    let (st, read) = s.get(path).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(read["state"], "in_progress");

    let (st, done) = s
        .send(
            Method::PUT,
            path,
            Some(json!({"lease_id": lease_id, "result": {"status": 201, "headers": [["location", "/b/42"]], "body": "booked"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{done}");
    let resp = s
        .client
        .post(s.url(path))
        .json(&json!({"fingerprint": "f1", "holder": "w4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("idempotent-replayed").unwrap(), "true");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "completed");
    assert_eq!(body["result"]["body"], "booked");
    assert_eq!(body["result"]["status"], 201);

    // Abort: begin another key, abort, begin again starts.
    let p2 = "/v1/idempotency/booking/43";
    let (_, started) = s.post(p2, json!({"fingerprint": "f", "holder": "w"})).await;
    let lid = started["lease_id"].as_str().unwrap();
    let (st, _) = s
        .send(Method::DELETE, p2, Some(json!({"lease_id": lid})))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s.post(p2, json!({"fingerprint": "f", "holder": "w"})).await;
    assert_eq!(st, StatusCode::CREATED);

    assert_error(
        &s.get("/v1/idempotency/never/used").await,
        404,
        "idempotency_not_found",
    );
    assert_error(
        &s.send(
            Method::DELETE,
            "/v1/idempotency/never/used",
            Some(json!({"lease_id": lid})),
        )
        .await,
        404,
        "idempotency_not_found",
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_names_the_field() {
    let s = TestServer::memory().await;
    let cases = [
        (json!({"locks": [{"key": "a"}]}), "holder"),
        (
            json!({"holder": "h", "locks": [{"key": "a", "mode": "bogus"}]}),
            "locks[0].mode",
        ),
        (
            json!({"holder": "h", "ttl_ms": "soon", "locks": [{"key": "a"}]}),
            "ttl_ms",
        ),
        (
            json!({"holder": "h", "locks": [{"key": "a"}], "extra": 1}),
            "extra",
        ),
        (
            json!({"holder": "h", "locks": [{"key": "a", "mode": "semaphore"}]}),
            "locks[0].limit",
        ),
    ];
    for (body, field) in cases {
        let answer = s.post("/v1/leases", body.clone()).await;
        assert_error(&answer, 400, "invalid_request");
        assert_eq!(answer.1["field"], field, "{body} → {}", answer.1);
    }
    // Engine validation (empty key, TTL out of range) is invalid_request too.
    assert_error(
        &s.post("/v1/leases", json!({"holder": "h", "locks": [{"key": ""}]}))
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &s.post(
            "/v1/leases",
            json!({"holder": "h", "ttl_ms": 1, "locks": [{"key": "a"}]}),
        )
        .await,
        400,
        "invalid_request",
    );
    // Limits: key and holder length, metadata size, locks per request.
    let limit_cases = [
        json!({"holder": "h", "locks": [{"key": "k".repeat(513)}]}),
        json!({"holder": "h".repeat(257), "locks": [{"key": "a"}]}),
        json!({"holder": "h", "metadata": {"m": "x".repeat(5000)}, "locks": [{"key": "a"}]}),
        json!({"holder": "h", "locks": (0..65).map(|i| json!({"key": format!("many/{i}")})).collect::<Vec<_>>()}),
        json!({"holder": "h", "wait_ms": 60_001, "locks": [{"key": "a"}]}),
    ];
    for body in limit_cases {
        let answer = s.post("/v1/leases", body).await;
        assert_error(&answer, 400, "invalid_request");
        assert!(answer.1["field"].is_string(), "{}", answer.1);
    }
    // Syntax errors and empty bodies.
    let resp = s
        .client
        .post(s.url("/v1/leases"))
        .body("{\"holder\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    let resp = s.client.post(s.url("/v1/leases")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Bad query.
    assert_error(&s.get("/v1/locks?bogus=1").await, 400, "invalid_request");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_method_not_allowed_payload_too_large_are_json() {
    let s = TestServer::memory().await;
    assert_error(&s.get("/nope").await, 404, "not_found");
    assert_error(&s.get("/v1/leases/x/y/z").await, 404, "not_found");
    assert_error(
        &s.send(Method::PUT, "/v1/leases", None).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &s.send(Method::DELETE, "/v1/locks", None).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &s.post("/v1/admin/locks/some/key/unrelease", json!({"reason": "x"}))
            .await,
        404,
        "not_found",
    );
    let big = "x".repeat(100 * 1024);
    let answer = s
        .post(
            "/v1/leases",
            json!({"holder": big, "locks": [{"key": "a"}]}),
        )
        .await;
    assert_error(&answer, 413, "payload_too_large");
    // Idempotency completion takes up to 1 MiB, and refuses more.
    let (_, started) = s
        .post(
            "/v1/idempotency/big",
            json!({"fingerprint": "f", "holder": "w"}),
        )
        .await;
    let lid = started["lease_id"].as_str().unwrap();
    let (st, body) = s
        .send(
            Method::PUT,
            "/v1/idempotency/big",
            Some(
                json!({"lease_id": lid, "result": {"status": 200, "body": "y".repeat(512 * 1024)}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (_, started) = s
        .post(
            "/v1/idempotency/bigger",
            json!({"fingerprint": "f", "holder": "w"}),
        )
        .await;
    let lid = started["lease_id"].as_str().unwrap();
    let answer = s
        .send(
            Method::PUT,
            "/v1/idempotency/bigger",
            Some(json!({"lease_id": lid, "result": {"status": 200, "body": "y".repeat(1024 * 1024 + 1)}})),
        )
        .await;
    assert_error(&answer, 413, "payload_too_large");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_waiters_per_key_and_leases_per_token() {
    let mut config = holdfast_server::ServerConfig::ephemeral_memory();
    config.limits.engine.waiters_per_key_max = 1;
    config.limits.leases_per_token_max = 2;
    config.tokens = vec![holdfast_server::config::TokenConfig {
        name: "c".into(),
        role: holdfast_server::config::Role::Client,
        sha256: holdfast_server::auth::hash_secret("sec"),
        prefixes: None,
    }];
    let owner = TestServer::start(config).await;
    let s = owner.as_token("sec");
    s.acquire("a", &["hot"]).await;
    let s2 = s.handle();
    let waiter = tokio::spawn(async move {
        s2.post(
            "/v1/leases",
            json!({"holder": "b", "wait_ms": 2_000, "locks": [{"key": "hot"}]}),
        )
        .await
    });
    s.wait_for_waiters("hot", 1).await;
    let resp = s
        .client
        .post(s.url("/v1/leases"))
        .bearer_auth("sec")
        .json(&json!({"holder": "c", "wait_ms": 2_000, "locks": [{"key": "hot"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    assert_error(&waiter.await.unwrap(), 409, "wait_timeout");
    // Quota: 2 leases per token.
    let q1 = s.acquire("a", &["q1"]).await;
    let answer = s
        .post(
            "/v1/leases",
            json!({"holder": "a", "locks": [{"key": "q2"}]}),
        )
        .await;
    assert_error(&answer, 503, "overloaded");
    assert!(
        answer.1["message"]
            .as_str()
            .unwrap()
            .contains("leases_per_token_max")
    );
    // A released lease no longer counts.
    let q1_id = q1["lease_id"].as_str().unwrap();
    let (status, body) = s.delete(&format!("/v1/leases/{q1_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    s.acquire("a", &["q2"]).await;
    owner.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_force_release_lock_and_lease() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["adm/one/release", "adm/two"]).await;
    // A key that itself ends in /release: the last /release is the action.
    let (st, body) = s
        .post(
            &format!("/v1/admin/locks/{}/release", enc("adm/one/release")),
            json!({"reason": "stuck"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["released"][0]["holder"], "alice");
    assert_eq!(s.holders("adm/one/release").await, 0);
    assert_error(
        &s.post("/v1/admin/locks/adm/two/release", json!({"reason": ""}))
            .await,
        400,
        "invalid_request",
    );
    let id = a["lease_id"].as_str().unwrap();
    let (st, body) = s
        .post(
            &format!("/v1/admin/leases/{id}/release"),
            json!({"reason": "gone"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(s.holders("adm/two").await, 0);
    assert_error(
        &s.get(&format!("/v1/leases/{id}")).await,
        404,
        "lease_not_found",
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_check() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["fence/k"]).await;
    let token = a["locks"][0]["fencing_token"].as_u64().unwrap();
    let (st, body) = s
        .post(
            "/v1/fencing/check",
            json!({"key": "fence/k", "fencing_token": token}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["current"], true);
    let id = a["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;
    let b = s.acquire("bob", &["fence/k"]).await;
    let token2 = b["locks"][0]["fencing_token"].as_u64().unwrap();
    assert!(token2 > token);
    let (_, body) = s
        .post(
            "/v1/fencing/check",
            json!({"key": "fence/k", "fencing_token": token}),
        )
        .await;
    assert_eq!(body["current"], false);
    assert_eq!(body["current_tokens"], json!([token2]));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints() {
    let s = TestServer::memory().await;
    let a = s.acquire("alice", &["ops/k"]).await;
    let id = a["lease_id"].as_str().unwrap();
    s.delete(&format!("/v1/leases/{id}")).await;
    let (st, stats) = s.get("/v1/stats").await;
    assert_eq!(st, StatusCode::OK);
    assert!(stats["grants_total"].as_u64().unwrap() >= 1);
    assert_eq!(stats["durability"], "memory");
    assert!(stats["hold_ms"]["count"].as_u64().unwrap() >= 1);
    let (st, h) = s.get("/healthz").await;
    assert_eq!((st, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (st, _) = s.get("/readyz").await;
    assert_eq!(st, StatusCode::OK);
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "holdfast_grants_total",
        "holdfast_releases_total",
        "holdfast_deadlocks_total",
        "holdfast_expirations_total",
        "holdfast_wait_timeouts_total",
        "holdfast_force_releases_total",
        "holdfast_hold_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing in {text}");
    }
    assert!(text.contains("holdfast_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/v1/leases\""), "{text}");
    let html = s
        .client
        .get(s.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("<html"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route_and_error_code() {
    let s = TestServer::memory().await;
    let (st, doc) = s.get("/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/leases",
        "/v1/leases/{id}",
        "/v1/leases/{id}/locks",
        "/v1/leases/{id}/locks/{key}",
        "/v1/leases/{id}/renew",
        "/v1/locks",
        "/v1/locks/{key}",
        "/v1/admin/locks/{key}/release",
        "/v1/admin/leases/{id}/release",
        "/v1/idempotency/{key}",
        "/v1/fencing/check",
        "/v1/events",
        "/v1/stats",
        "/v1/openapi.json",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.contains_key(p), "openapi lacks {p}");
    }
    let description = doc["info"]["description"].as_str().unwrap();
    for code in holdfast_api::ErrorCode::ALL {
        assert!(description.contains(&format!("`{}` | {}", code.as_str(), code.http_status())));
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ErrorBody",
        "ErrorCode",
        "CreateLeaseRequest",
        "LeaseResponse",
        "LockState",
        "StatsResponse",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_twin_waits_for_the_outcome() {
    let s = TestServer::memory().await;
    let path = "/v1/idempotency/wait/1";
    let (st, started) = s
        .post(path, json!({"fingerprint": "f", "holder": "exec"}))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let lease_id = started["lease_id"].as_str().unwrap().to_owned();
    let c = s.handle();
    let twin = tokio::spawn(async move {
        c.post(
            path,
            json!({"fingerprint": "f", "holder": "twin", "wait_ms": 30_000}),
        )
        .await
    });
    // Wait until the twin is queued (it shows in the stats as a waiter).
    for _ in 0..2_000 {
        let (_, stats) = s.get("/v1/stats").await;
        if stats["waiters"].as_u64() == Some(1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (st, _) = s
        .send(
            Method::PUT,
            path,
            Some(json!({"lease_id": lease_id, "result": {"status": 200, "body": "ok"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = twin.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "completed");
    assert_eq!(body["result"]["body"], "ok");
    s.shutdown().await;
}
