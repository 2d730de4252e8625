//! Tokens, roles, prefixes and lease ownership.

use holdfast_server::ServerConfig;
use holdfast_server::auth::hash_secret;
use holdfast_server::config::{Role, TokenConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestServer, assert_error};

fn token(name: &str, role: Role, secret: &str, prefixes: Option<&[&str]>) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        role,
        sha256: hash_secret(secret),
        prefixes: prefixes.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
    }
}

async fn server() -> TestServer {
    let mut config = ServerConfig::ephemeral_memory();
    config.tokens = vec![
        token("root", Role::Admin, "admin-secret", None),
        token("clinic", Role::Client, "clinic-secret", Some(&["clinic/"])),
        token(
            "clinic2",
            Role::Client,
            "clinic2-secret",
            Some(&["clinic/"]),
        ),
        token("viewer", Role::Reader, "reader-secret", Some(&["clinic/"])),
    ];
    TestServer::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_token_is_unauthorized() {
    let s = server().await;
    let resp = s.client.get(s.url("/v1/locks")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert_error(
        &s.as_token("nope").get("/v1/locks").await,
        401,
        "unauthorized",
    );
    assert_error(
        &s.as_token("nope")
            .post(
                "/v1/leases",
                json!({"holder": "h", "locks": [{"key": "clinic/a"}]}),
            )
            .await,
        401,
        "unauthorized",
    );
    // Health, readiness, metrics and the OpenAPI document need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        let st = s.client.get(s.url(path)).send().await.unwrap().status();
        assert_eq!(st, StatusCode::OK, "{path}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_are_enforced() {
    let s = server().await;
    let c = s.as_token("clinic-secret");
    let answer = c
        .post(
            "/v1/leases",
            json!({"holder": "h", "locks": [{"key": "clinic/a"}, {"key": "billing/b"}]}),
        )
        .await;
    assert_error(&answer, 403, "forbidden");
    assert_eq!(answer.1["key"], "billing/b");
    assert_error(
        &c.post(
            "/v1/idempotency/billing/x",
            json!({"fingerprint": "f", "holder": "h"}),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(&c.get("/v1/locks/billing/x").await, 403, "forbidden");
    assert_error(
        &c.post(
            "/v1/fencing/check",
            json!({"key": "billing/x", "fencing_token": 1}),
        )
        .await,
        403,
        "forbidden",
    );
    c.acquire("h", &["clinic/a"]).await;
    // The admin's lock elsewhere is not listed to the client.
    s.as_token("admin-secret")
        .acquire("root", &["billing/z"])
        .await;
    let (_, list) = c.get("/v1/locks").await;
    let keys: Vec<&str> = list["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["clinic/a"]);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_creator_or_an_admin_may_use_a_lease() {
    let s = server().await;
    let owner = s.as_token("clinic-secret");
    let other = s.as_token("clinic2-secret");
    let admin = s.as_token("admin-secret");
    let lease = owner.acquire("alice", &["clinic/owned"]).await;
    let id = lease["lease_id"].as_str().unwrap();

    assert_error(
        &other
            .post(&format!("/v1/leases/{id}/renew"), json!({}))
            .await,
        404,
        "lease_not_found",
    );
    assert_error(
        &other.delete(&format!("/v1/leases/{id}")).await,
        404,
        "lease_not_found",
    );
    assert_error(
        &other
            .delete(&format!("/v1/leases/{id}/locks/clinic/owned"))
            .await,
        404,
        "lease_not_found",
    );
    assert_error(
        &other.get(&format!("/v1/leases/{id}")).await,
        404,
        "lease_not_found",
    );
    assert_error(
        &other
            .post(
                &format!("/v1/leases/{id}/locks"),
                json!({"locks": [{"key": "clinic/more"}]}),
            )
            .await,
        404,
        "lease_not_found",
    );
    // Lease ids are shown to the creator and admins only.
    let (_, info) = other.get("/v1/locks/clinic/owned").await;
    assert!(info["holders"][0].get("lease_id").is_none(), "{info}");
    let (_, info) = owner.get("/v1/locks/clinic/owned").await;
    assert_eq!(info["holders"][0]["lease_id"], id);
    let (_, info) = admin.get("/v1/locks/clinic/owned").await;
    assert_eq!(info["holders"][0]["lease_id"], id);

    let (st, _) = owner
        .post(&format!("/v1/leases/{id}/renew"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = admin.get(&format!("/v1/leases/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = owner.delete(&format!("/v1/leases/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_force_release_and_readers_only_read() {
    let s = server().await;
    let client = s.as_token("clinic-secret");
    let reader = s.as_token("reader-secret");
    let admin = s.as_token("admin-secret");
    let lease = client.acquire("alice", &["clinic/x"]).await;
    let id = lease["lease_id"].as_str().unwrap();
    assert_error(
        &client
            .post(
                "/v1/admin/locks/clinic/x/release",
                json!({"reason": "mine"}),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &client
            .post(
                &format!("/v1/admin/leases/{id}/release"),
                json!({"reason": "r"}),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &reader
            .post("/v1/admin/locks/clinic/x/release", json!({"reason": "r"}))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &reader
            .post(
                "/v1/leases",
                json!({"holder": "r", "locks": [{"key": "clinic/y"}]}),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &reader
            .send(
                Method::PUT,
                "/v1/idempotency/clinic/i",
                Some(json!({"lease_id": id, "result": {"status": 200}})),
            )
            .await,
        403,
        "forbidden",
    );
    let (st, list) = reader.get("/v1/locks").await;
    assert_eq!(st, StatusCode::OK);
    assert!(list["locks"][0]["holders"][0].get("lease_id").is_none());
    let (st, _) = reader.get("/v1/stats").await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = admin
        .post(
            "/v1/admin/locks/clinic/x/release",
            json!({"reason": "stuck"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    // The lease lost the key (it lives on, holding nothing).
    let (st, renewed) = client
        .post(&format!("/v1/leases/{id}/renew"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(renewed["locks"].as_array().unwrap().is_empty(), "{renewed}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_refuses_non_loopback_unless_forced() {
    let config = ServerConfig {
        listen: "0.0.0.0:0".into(),
        ..ServerConfig::ephemeral_memory()
    };
    let err = holdfast_server::start(config.clone()).await.unwrap_err();
    assert!(err.to_string().contains("--allow-insecure-bind"), "{err}");
    let forced = holdfast_server::start(ServerConfig {
        allow_insecure_bind: true,
        ..config
    })
    .await
    .unwrap();
    forced.shutdown().await;
}
